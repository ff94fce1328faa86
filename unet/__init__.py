"""Brain-tumour segmentation in multi-modal MRI: data, U-Net, training, evaluation and registry."""

__version__ = "0.1.0"
