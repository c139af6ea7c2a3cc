/* The attention view shared by the HTML report and the web app (caption/views/web/attention.js).
 *
 * A record is what caption.views.report.attention_record returns: the words and their gates
 * (betas), the encoder grid [H', W'], the colour scale (vmax: one number, or one per word),
 * the attention rows (floats in `attention`, or uint8 in base64 `attention_u8` scaled by
 * `attention_max`), and hard attention's `locations` or local attention's `windows` (per
 * word, one window per head).
 *
 * Word t's heat map is its H'×W' map interpolated bilinearly between cell centres to the
 * canvas, coloured with the colormap of the PNG figures and blended over the image. Hovering a
 * word shows its map, clicking pins it, and the arrow keys move through the words of the view
 * last touched.
 */
"use strict";
const AttentionView = (() => {
  const config = JSON.parse(document.getElementById("attention-config").textContent);
  const lut = new Uint8Array(config.colormap.length / 2); // 256 RGB triples from hex
  for (let i = 0; i < lut.length; i++) lut[i] = parseInt(config.colormap.substr(2 * i, 2), 16);
  let active = null;

  function rows(rec) {
    if (rec._rows) return rec._rows;
    const L = rec.grid[0] * rec.grid[1];
    let out;
    if (rec.attention) {
      out = rec.attention.map((r) => Float32Array.from(r));
    } else {
      const bytes = atob(rec.attention_u8);
      const scale = rec.attention_max / 255;
      out = rec.words.map((_, t) => {
        const r = new Float32Array(L);
        for (let i = 0; i < L; i++) r[i] = bytes.charCodeAt(t * L + i) * scale;
        return r;
      });
    }
    Object.defineProperty(rec, "_rows", { value: out }); // a cache, never serialised
    return out;
  }

  // Bilinear between cell centres, clamped at the borders (align_corners=False in torch).
  function heat(row, H, W, w, h) {
    const out = new Float32Array(w * h);
    for (let y = 0; y < h; y++) {
      const fy = Math.min(Math.max(((y + 0.5) * H) / h - 0.5, 0), H - 1);
      const y0 = Math.floor(fy), y1 = Math.min(y0 + 1, H - 1), dy = fy - y0;
      for (let x = 0; x < w; x++) {
        const fx = Math.min(Math.max(((x + 0.5) * W) / w - 0.5, 0), W - 1);
        const x0 = Math.floor(fx), x1 = Math.min(x0 + 1, W - 1), dx = fx - x0;
        const top = row[y0 * W + x0] * (1 - dx) + row[y0 * W + x1] * dx;
        const bottom = row[y1 * W + x0] * (1 - dx) + row[y1 * W + x1] * dx;
        out[y * w + x] = top * (1 - dy) + bottom * dy;
      }
    }
    return out;
  }

  /** Draw the image, then word t's heat map and marks over it (t < 0: the image alone). */
  function draw(canvas, img, rec, t) {
    const ctx = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height;
    ctx.clearRect(0, 0, w, h);
    if (img.complete && img.naturalWidth) ctx.drawImage(img, 0, 0, w, h);
    canvas.dataset.shown = String(t);
    if (t < 0 || t >= rec.words.length) return;
    const [H, W] = rec.grid;
    const values = heat(rows(rec)[t], H, W, w, h);
    const top = Array.isArray(rec.vmax) ? rec.vmax[t] : rec.vmax;
    const layer = document.createElement("canvas");
    layer.width = w;
    layer.height = h;
    const lctx = layer.getContext("2d");
    const pixels = lctx.createImageData(w, h);
    for (let i = 0; i < w * h; i++) {
      const k = 3 * Math.min(255, Math.max(0, Math.round((values[i] / top) * 255)));
      pixels.data.set([lut[k], lut[k + 1], lut[k + 2], 255], 4 * i);
    }
    lctx.putImageData(pixels, 0, 0);
    ctx.globalAlpha = config.overlay_alpha;
    ctx.drawImage(layer, 0, 0);
    ctx.globalAlpha = 1;
    const cw = w / W, ch = h / H;
    if (rec.locations && rec.locations[t] >= 0) {
      const i = Math.floor(rec.locations[t] / W), j = rec.locations[t] % W;
      ctx.strokeStyle = config.hard_color;
      ctx.lineWidth = 2;
      ctx.strokeRect(j * cw + 1, i * ch + 1, cw - 2, ch - 2);
    }
    for (const win of (rec.windows && rec.windows[t]) || []) {
      if (!win) continue;
      const [r0, r1, c0, c1] = win.cells;
      ctx.strokeStyle = config.window_color;
      ctx.lineWidth = 1.5;
      ctx.setLineDash([5, 3]);
      ctx.strokeRect(c0 * cw + 1, r0 * ch + 1, (c1 - c0 + 1) * cw - 2, (r1 - r0 + 1) * ch - 2);
      ctx.setLineDash([]);
      const x = win.centre[1] * cw, y = win.centre[0] * ch;
      ctx.beginPath();
      ctx.moveTo(x - 5, y);
      ctx.lineTo(x + 5, y);
      ctx.moveTo(x, y - 5);
      ctx.lineTo(x, y + 5);
      ctx.stroke();
    }
  }

  function element(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function activate(view) {
    if (active && active !== view) active.root.classList.remove("av-active");
    active = view;
    view.root.classList.add("av-active");
  }

  /**
   * Build a view of `rec` over the image at `src` inside `root`.
   * Returns {root, rec, canvas, show(t), pin(t), step(d), loaded: a promise of the image drawn}.
   */
  function mount(root, rec, src, side = 224) {
    root.classList.add("av");
    const canvas = element("canvas", "av-canvas");
    canvas.width = canvas.height = side;
    const label = element("div", "av-label");
    const words = element("div", "av-words");
    rec.words.forEach((word, t) => {
      const b = element("button", "av-word");
      b.type = "button";
      b.dataset.t = String(t);
      b.append(word, element("small", "av-beta", `β ${rec.betas[t].toFixed(2)}`));
      words.append(b);
    });
    root.append(canvas, label, words);
    const img = new Image();
    let pinned = -1, shown = -1;
    const mark = () => {
      for (const b of words.children) {
        const t = Number(b.dataset.t);
        b.classList.toggle("av-shown", t === shown);
        b.classList.toggle("av-pinned", t === pinned);
      }
    };
    const view = {
      root, rec, canvas,
      show(t) {
        shown = t;
        draw(canvas, img, rec, t);
        mark();
        if (t < 0) {
          label.textContent = rec.words.length ? "hover or click a word; ← → move" : "(empty)";
        } else {
          let text = `${rec.words[t]} · β = ${rec.betas[t].toFixed(2)}`;
          if (rec.locations) text += " · sampled cell outlined";
          if (rec.windows) text += " · window outlined";
          label.textContent = text;
        }
      },
      pin(t) {
        pinned = t;
        activate(view);
        view.show(t);
      },
      step(d) {
        const n = rec.words.length;
        if (!n) return;
        const from = pinned >= 0 ? pinned : shown;
        view.pin(from < 0 ? (d > 0 ? 0 : n - 1) : Math.min(n - 1, Math.max(0, from + d)));
      },
    };
    words.addEventListener("mouseover", (e) => {
      const b = e.target.closest(".av-word");
      if (!b) return;
      activate(view);
      view.show(Number(b.dataset.t));
    });
    words.addEventListener("mouseleave", () => view.show(pinned));
    words.addEventListener("click", (e) => {
      const b = e.target.closest(".av-word");
      if (b) view.pin(Number(b.dataset.t));
    });
    canvas.addEventListener("click", () => activate(view));
    view.loaded = new Promise((resolve) => {
      img.onload = () => {
        const scale = side / Math.max(img.naturalWidth, img.naturalHeight);
        canvas.width = Math.max(1, Math.round(img.naturalWidth * scale));
        canvas.height = Math.max(1, Math.round(img.naturalHeight * scale));
        view.show(shown);
        resolve(view);
      };
      img.onerror = () => resolve(view);
    });
    img.src = src;
    view.show(-1);
    return view;
  }

  document.addEventListener("keydown", (e) => {
    if (!active || e.target.matches("input, select, textarea")) return;
    if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
      active.step(e.key === "ArrowRight" ? 1 : -1);
      e.preventDefault();
    }
  });

  return { mount, draw, rows, config };
})();
