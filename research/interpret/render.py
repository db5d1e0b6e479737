"""Displays for notebooks: attributions as coloured text, attention heat maps."""

from __future__ import annotations

import html

import numpy as np

from research.interpret.attribution import Attribution


def _real(tokens, mask, skip_padding):
  """Indices of the positions to show (real tokens unless told otherwise)."""
  mask = np.asarray(mask)
  return [i for i in range(len(tokens)) if mask[i] or not skip_padding]


def attribution_html(attribution: Attribution, *, skip_padding: bool = True,
                     scale: float | None = None) -> str:
  """The tokens as HTML spans, background red (+) or blue (-) by score.

  Args:
    attribution: from `integrated_gradients` or `gradient_x_input`.
    skip_padding: leave out positions with attention_mask 0.
    scale: the |score| of full colour (default: the largest shown), so that
      several examples can share one scale.

  Returns:
    An HTML string (`IPython.display.HTML(...)` renders it); each span's
    title holds its exact score.
  """
  keep = _real(attribution.tokens, attribution.attention_mask, skip_padding)
  scores = attribution.scores[keep]
  scale = scale or float(np.max(np.abs(scores), initial=0.0)) or 1.0
  spans = []
  for i, s in zip(keep, scores):
    alpha = min(abs(float(s)) / scale, 1.0)
    rgb = "220,40,40" if s > 0 else "40,90,220"
    spans.append(
        f'<span title="{float(s):+.4f}" style="background-color: '
        f'rgba({rgb},{alpha:.3f}); padding: 1px 3px; margin: 1px; '
        f'border-radius: 3px; font-family: monospace">'
        f"{html.escape(attribution.tokens[i])}</span>")
  caption = (f"{attribution.method}, target {attribution.target}: output "
             f"{attribution.output:+.3f}, baseline ({attribution.baseline}) "
             f"{attribution.baseline_output:+.3f}")
  return (f'<div style="line-height: 2">{" ".join(spans)}<br>'
          f'<small>{html.escape(caption)}</small></div>')


def plot_attention(maps: np.ndarray, tokens, layer: int, head: int, *,
                   attention_mask=None, ax=None):
  """A heat map of one head's attention (rows: queries, columns: keys).

  Args:
    maps: [layers, heads, t, t] from `research.interpret.attention_maps`.
    tokens: the t token strings.
    layer: layer index.
    head: head index.
    attention_mask: [t]; padding rows and columns are left out when given.
    ax: a matplotlib Axes (default: a new figure's).

  Returns:
    The Axes.
  """
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  mask = np.ones(len(tokens)) if attention_mask is None else attention_mask
  keep = _real(tokens, mask, True)
  probs = maps[layer, head][np.ix_(keep, keep)]  # [q, k]
  labels = [tokens[i] for i in keep]
  if ax is None:
    size = 2.5 + 0.3 * len(keep)
    _, ax = plt.subplots(figsize=(size, size))
  image = ax.imshow(probs, cmap="viridis", vmin=0.0, vmax=1.0)
  ax.set_xticks(range(len(labels)), labels, rotation=90)
  ax.set_yticks(range(len(labels)), labels)
  ax.set_xlabel("key (attended to)")
  ax.set_ylabel("query")
  ax.set_title(f"layer {layer}, head {head}")
  ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
  return ax
