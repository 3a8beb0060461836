"""The model card's reproduction command and target verdicts (fair_calib.train.card)."""

import shlex
from dataclasses import asdict

from fair_calib.train.card import targets_text, train_command
from fair_calib.train.tiny import TrainConfig, main


def test_train_command_lists_only_settings_that_differ_from_the_defaults():
    tc = asdict(TrainConfig(family="llada", steps=800, lr=1e-3, task_weights={"addition": 1.0}))
    cmd = train_command(tc, "fair_calib/assets/tiny-llada")
    assert cmd == ("python -m fair_calib.train.tiny --family llada --threads 2 --out fair_calib/assets/tiny-llada "
                   "--steps 800 --lr 0.001 --task-weights '{\"addition\": 1.0}'")


def test_train_command_round_trips_through_the_trainer_parser(monkeypatch, tmp_path):
    tc = asdict(TrainConfig(family="dream", n_kv_heads=2, steps=1500, warmup=20, task_weights={"compare": 2.0}))
    seen = []

    def fake_train(c):
        seen.append(c)
        return {"parameters": 0, "wall_time_s": 0.0}

    monkeypatch.setattr("fair_calib.train.tiny.train", fake_train)
    out = str(tmp_path / "m")
    main(shlex.split(train_command(tc, out))[3:])
    assert [asdict(c) for c in seen] == [{**tc, "out": out}]


def test_targets_text_marks_each_target_met_or_not():
    text = targets_text({"tinyreason_addition": {"exact_match": 0.905},
                         "tinyreason_word_problems": {"exact_match": 0.59},
                         "tinyreason_compare": {"acc": 0.9}})
    assert text.splitlines() == [
        "- addition: 90.5 % (target >= 90): met",
        "- word_problems: 59.0 % (target >= 60): NOT met",
        "- compare: 90.0 % (target >= 90): met",
    ]
