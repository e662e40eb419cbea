"""sft-ray: supervised fine-tuning (LoRA, QLoRA) with Ray Data and Ray Train."""

__version__ = "0.1.0"
