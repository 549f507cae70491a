"""PyTorch / Hugging Face weights in and out of segjax models (torch is needed only for pickles).

Schemes (`SCHEMES`): torchvision_resnet, torchvision_deeplabv3, smp_unet, timm_darknet53.
Hugging Face Mask2Former directories (config.json + weights) in and out:
`segjax.bridge.hf_mask2former` (load_hf_mask2former, save_hf_mask2former).
"""
from segjax.bridge.schemes import SCHEMES, Rule, Scheme
from segjax.bridge.torch_import import import_torch_weights, load_torch_state_dict, to_torch_state_dict

__all__ = ["SCHEMES", "Rule", "Scheme", "import_torch_weights", "load_torch_state_dict",
           "to_torch_state_dict"]
