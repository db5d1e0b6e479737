"""Interpretability: attention maps and token attributions.

    from research import data, interpret
    from research.models import hf

    model, _ = hf.load_pretrained(model_dir, "sequence_classification", 2)
    tokenizer = data.load_tokenizer(str(hf.resolve(model_dir)))
    inputs = interpret.encode(tokenizer, "a warm, funny film")
    maps = interpret.attention_maps(model, inputs)  # [layers, heads, t, t]
    attr = interpret.integrated_gradients(model, inputs, target=1,
                                          baseline="pad", steps=50)
    attr.tokens, attr.scores                        # one score per token
    interpret.completeness(attr).ok                 # sum == f(x) - f(baseline)

Everything runs through the model itself: attributions differentiate its
output with respect to `inputs_embeds`; attention maps are the probabilities
its `SelfAttention` layers sow when called with `sow_attention=True` (the
default fused kernel never materialises them).
"""

from research.interpret.attribution import Attribution
from research.interpret.attribution import BASELINES
from research.interpret.attribution import Completeness
from research.interpret.attribution import baseline_embeddings
from research.interpret.attribution import completeness
from research.interpret.attribution import gradient_x_input
from research.interpret.attribution import integrated_gradients
from research.interpret.forward import Inputs
from research.interpret.forward import Trace
from research.interpret.forward import attention_maps
from research.interpret.forward import encode
from research.interpret.forward import forward
from research.interpret.forward import word_embeddings
from research.interpret.render import attribution_html
from research.interpret.render import plot_attention
