"""Support code of int8 quantisation (google's qwix): `int8.py`.

The training-time method is `research/methods/qat.py`; post-training
quantisation of a finished run is `research.compress --quantize`.
"""
