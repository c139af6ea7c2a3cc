"""Views: what the model looked at, drawn for people.

- `attention`: `AttentionView`, one caption's words with each word's attention, gate and
  marks, and the helpers every view shares (heat maps, window cells, the colour scale).
- `figures`: `attention_figure`, the matplotlib figure of one caption (PNGs, notebooks).
- `report`: the JSON records the browser draws, the self-contained HTML report, and the
  pages of `web/` (the report and the web app share its script and styles).
"""
