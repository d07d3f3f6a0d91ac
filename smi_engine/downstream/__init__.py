"""What synthetic data is for, and what measures it: teacher training, knowledge transfer
(``distill``), accuracy (``evaluate``), image export, and the task plugin interface (``tasks``).
Quantisation, the largest, has its own package (``smi_engine.quantization``)."""
