"""What synthetic data is for, and what measures it: teacher training, knowledge transfer
(``distill``), quantisation (``quantize``, ``reconstruct``), accuracy (``evaluate``), image export,
the task plugin interface (``tasks``) and the built-in default job (``demo``).
The model transformation that quantisation applies is a package of its own, lower down
(``smi_engine.quantization``)."""
