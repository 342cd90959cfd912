"""Pictures of rollouts: `render_page(rollouts, tokenizer)` draws them as reasoning graphs in one HTML page."""

from npr.viz.html import render_page

__all__ = ["render_page"]
