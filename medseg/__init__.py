"""medseg: MONAI-based 3D brain-tumour segmentation for multi-modal BraTS MRI.

Kept light on purpose (no torch import) so that `medseg --help` is fast.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
