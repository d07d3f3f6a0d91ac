"""smi from Python: invert a model in memory, quantise or distil with the images, read runs.

The stable surface for notebooks and scripts; what the command line does, on objects::

    import smi, timm
    teacher = timm.create_model("deit_tiny_patch16_224", pretrained=True)
    pool = smi.invert(teacher, schedule="50:0.3,100:0.3,200:0.3,300:0.3", iterations=500)
    quantized = smi.quantize(teacher, pool, scheme="repq", w_bit=4, a_bit=4)
    print(smi.evaluate(quantized, "imagenet:/data/imagenet", mean=pool.normalizer.mean, std=pool.normalizer.std))

A model is an ``nn.Module`` (a timm ViT/DeiT for inversion) or the folder ``smi teacher
train`` (or ``save_model``) wrote. Its normalisation is ``mean``/``std`` where given, else the
folder's, else timm's data config. Progress is a bar in a terminal or a notebook, plain lines
elsewhere; ``progress=False`` is silent. Errors are ``SmiError`` with one line saying what to do.
"""

from smi.api import Accuracy, Distilled, Run, distill, evaluate, invert, load_model, quantize, save_model
from smi_engine.inversion.losses import LossSpec
from smi_engine.quantization.names import ReconstructConfig
from smi_engine.inversion.selection import SelectionSpec
from smi_engine.errors import SmiError
from smi_engine.models import Normalizer
from smi_engine.pool import Pool, load_pool

__all__ = ["Accuracy", "Distilled", "LossSpec", "Normalizer", "Pool", "ReconstructConfig", "Run", "SelectionSpec",
           "SmiError", "distill", "evaluate", "invert", "load_model", "load_pool", "quantize", "save_model"]
