"""Support code of the knowledge-distillation method (`research/methods/distill.py`).

  losses.py   soft cross-entropy at temperature T, hidden-state MSE, attention
              KL, the layer map, the trained projection (TinyBERT's W_h);
  teacher.py  the teacher: a `research.train` workdir or a Hugging Face
              directory, loaded and checked against the run; its outputs
              cached once per training example;
  student.py  the student's initial checkpoint: layers taken from a teacher
              (DistilBERT) or a fresh shape, written as a Hugging Face
              directory (also a command line).
"""
