"""lora_core: the ML logic of lora-flow (data, templates, LoRA training, evaluation, merge).

Plain library: no Prefect, no MLflow. Every module can be used from a notebook.
"""

__version__ = "0.1.0"
