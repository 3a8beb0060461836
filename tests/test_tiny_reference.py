"""benchmark=tiny gives, through the harness, exactly the numbers of its former own evaluation path.

REFERENCE was recorded with the code before `benchmark=tiny` became a harness configuration (commit fe05dfb,
`fair_calib/benchmark/tiny.py` TinyBenchmark): the shipped FP models, every metric, the per-document scores
the CIs resample and the generated answers. Dream samples at temperature 0.7, so its generations also pin
the random stream the two generation tasks share in one lm-eval call.
"""

from __future__ import annotations

import pytest

from fair_calib.benchmark.scores import task_scores
from fair_calib.decoding.dream import DreamSampler
from fair_calib.decoding.llada import LLaDASampler
from fair_calib.models.hf_folder import ASSETS, HFFolderModel
from fair_calib.registry import build

CASES = {
    "llada": ("tiny-llada", lambda: LLaDASampler(), {"n": 4, "mc_num": 4}, 0),
    "dream": ("tiny-dream", lambda: DreamSampler(temperature=0.7, gen_length=32, steps=16), {"n": 3, "mc_num": 4}, 1),
}

REFERENCE = {"llada": {"metrics": {"tinyreason_addition": {"exact_match": 1.0, "answer_ll": -0.02322464565440896},
                       "tinyreason_word_problems": {"exact_match": 1.0, "answer_ll": -10.558780312203453},
                       "tinyreason_compare": {"acc": 1.0, "answer_ll": -0.45581363707606215}},
           "scores": {"tinyreason_addition": {"exact_match": [1.0, 1.0, 1.0, 1.0],
                                              "answer_ll": [-0.004939209597068839,
                                                            -0.04547075345180929,
                                                            -0.005883988807909191,
                                                            -0.03660463076084852]},
                      "tinyreason_word_problems": {"exact_match": [1.0, 1.0, 1.0, 1.0],
                                                   "answer_ll": [-12.433282075449824,
                                                                 -5.148830657941289,
                                                                 -15.755883728154004,
                                                                 -8.897124787268694]},
                      "tinyreason_compare": {"acc": [1.0, 1.0, 1.0, 1.0],
                                             "answer_ll": [-0.04607736528851092,
                                                           -0.4279462695121765,
                                                           -0.35236912965774536,
                                                           -0.9968617838458158]}},
           "responses": {"tinyreason_addition": ["012", "081", "074", "048"],
                         "tinyreason_word_problems": ["3+2=5\n5-5=0\n#### 0",
                                                      "5-3=2\n2-2=0\n#### 0",
                                                      "1+2=3\n3+4=7\n#### 7",
                                                      "5+3=8\n8+1=9\n#### 9"]}},
 "dream": {"metrics": {"tinyreason_addition": {"exact_match": 1.0, "answer_ll": -0.009316182210265348},
                       "tinyreason_word_problems": {"exact_match": 0.6666666666666666,
                                                    "answer_ll": -3.239653804751773},
                       "tinyreason_compare": {"acc": 1.0, "answer_ll": -1.905181079787629}},
           "scores": {"tinyreason_addition": {"exact_match": [1.0, 1.0, 1.0],
                                              "answer_ll": [-0.017734543420374393,
                                                            -0.005899900803342462,
                                                            -0.00431410240707919]},
                      "tinyreason_word_problems": {"exact_match": [0.0, 1.0, 1.0],
                                                   "answer_ll": [-0.8788341991603374,
                                                                 -4.9591454860783415,
                                                                 -3.8809817290166393]},
                      "tinyreason_compare": {"acc": [1.0, 1.0, 1.0],
                                             "answer_ll": [-0.8925820142030716,
                                                           -0.3171633621532237,
                                                           -4.505797863006592]}},
           "responses": {"tinyreason_addition": ["012", "081", "074"],
                         "tinyreason_word_problems": ["3+2=5\n5-5=0\n#### 1",
                                                      "5-3=2\n2-2=0\n#### 0",
                                                      "1+2=3\n3+4=7\n#### 7"]}}}


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_numbers_are_those_of_the_former_evaluation_path(case: str) -> None:
    asset, sampler, cfg, seed = CASES[case]
    if not (ASSETS / asset / "config.json").is_file():
        pytest.skip(f"{asset} is not shipped")
    bench = build("benchmark", {"name": "tiny", "show_progress": False, **cfg})
    metrics = bench.evaluate(HFFolderModel(asset).load(), sampler(), seed=seed)
    ref = REFERENCE[case]
    assert metrics == ref["metrics"]  # exact: same requests, same batches, same random draws
    assert task_scores(bench.last_samples, bench.score_keys()) == ref["scores"]
    assert {t: [r["response"] for r in v] for t, v in bench.last_samples.items() if t != "tinyreason_compare"} == \
        ref["responses"]
