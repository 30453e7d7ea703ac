"""Embedded data generators: synthetic scenes in the Fashion-IQ / CIRR / Shoes / precomp layouts
(``synthetic``) and the Noto emoji CIR set (``emoji``). They write real dataset layouts that the loaders in
``cirlab.data`` read like any downloaded dataset."""
