"""Export of quantized models (packed INT weights + online transforms, Hugging Face-style folders) and the
runtime that executes them with the kernels of ``fair_calib.kernels``.

    save_quantized(model, folder)          # writer: config.json with quantization_config, model.safetensors
    load_dllm(folder)                      # models.loading: the layout named by quant_method (registry `layout`,
                                           # reload.install_from_config) installs the runtime
"""

from fair_calib.export.layout import ExportError
from fair_calib.export.writer import NonFiniteExportError, save_quantized

__all__ = ["ExportError", "NonFiniteExportError", "save_quantized"]
