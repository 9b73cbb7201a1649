// The report's explorer: one per run, over the run's Dataset as GRADLAB_RUNS[i] holds it
// ({variables: {name: {dims, shape, data}}, coords, sweep_axes, diverged: {dims, data}}).
(function () {
  "use strict";
  const PALETTE = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000", "#f0e442"];
  const SYMBOLS = ["circle", "square", "triangle-up", "diamond", "triangle-down", "cross", "x", "star"];
  const DASHES = ["solid", "dash", "dashdot", "dot", "longdash", "longdashdot", "solid", "dash"];

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // The coordinates of dim d for variable v: its own kept steps, or the run's coordinates.
  function coordsOf(run, v, d) {
    return d === "step" && v.step ? v.step : run.coords[d];
  }

  function strides(shape) {
    const out = new Array(shape.length).fill(1);
    for (let k = shape.length - 2; k >= 0; k--) out[k] = out[k + 1] * shape[k + 1];
    return out;
  }

  function select(label, options, value) {
    const wrap = el("label", {}, label + " ");
    const sel = el("select");
    for (const o of options) sel.appendChild(el("option", { value: o }, o));
    sel.value = value;
    wrap.appendChild(sel);
    return [wrap, sel];
  }

  function Explorer(root, run) {
    this.root = root;
    this.run = run;
    this.names = Object.keys(run.variables).filter((n) => run.variables[n].data.length > 0);
    this.state = { metric: this.pick(), fixed: {}, logx: false, logy: false };
    this.controls = el("div", { class: "controls" });
    this.fixedBox = el("div", { class: "controls" });
    this.plot = el("div", { class: "plot" });
    root.append(this.controls, this.fixedBox, this.plot);
    if (run.left_out.length) {
      root.appendChild(el("p", { class: "note" }, "Too large for the page (open results.nc): " + run.left_out.join(", ")));
    }
    this.build();
  }

  Explorer.prototype.pick = function () {
    for (const n of ["loss", "train_loss", "grad_norm"]) if (this.names.includes(n)) return n;
    const stepped = this.names.find((n) => this.run.variables[n].dims.includes("step"));
    return stepped || this.names[0];
  };

  Explorer.prototype.axesDefault = function (v) {
    const dims = v.dims;
    const long = (d) => coordsOf(this.run, v, d).length;
    const x = dims.includes("step") ? "step" : dims.includes("layer") ? "layer" : dims.slice().sort((a, b) => long(b) - long(a))[0];
    const rest = dims.filter((d) => d !== x && long(d) > 1);
    rest.sort((a, b) => (a === "seed") - (b === "seed") || long(a) - long(b));  // seeds fixed first
    const series = rest.find((d) => long(d) <= 8) || rest[0] || "(none)";
    return [x, series];
  };

  Explorer.prototype.build = function () {
    const self = this;
    this.controls.replaceChildren();
    if (!this.names.length) {
      this.plot.textContent = "no numeric results to explore";
      return;
    }
    const v = this.run.variables[this.state.metric];
    const [x0, s0] = this.axesDefault(v);
    if (!v.dims.includes(this.state.x)) this.state.x = x0;
    if (!(v.dims.includes(this.state.series) && this.state.series !== this.state.x)) this.state.series = s0;
    const [mWrap, mSel] = select("metric", this.names, this.state.metric);
    const [xWrap, xSel] = select("x axis", v.dims, this.state.x);
    const [sWrap, sSel] = select("series", ["(none)"].concat(v.dims.filter((d) => d !== this.state.x)), this.state.series);
    mSel.onchange = () => { self.state.metric = mSel.value; self.build(); };
    xSel.onchange = () => { self.state.x = xSel.value; if (self.state.series === xSel.value) self.state.series = "(none)"; self.build(); };
    sSel.onchange = () => { self.state.series = sSel.value; self.build(); };
    const logs = ["logx", "logy"].map((key) => {
      const wrap = el("label", {});
      const box = el("input", { type: "checkbox" });
      box.checked = this.state[key];
      box.onchange = () => { self.state[key] = box.checked; self.draw(); };
      wrap.append(box, document.createTextNode(" log " + key.slice(3)));
      return wrap;
    });
    this.controls.append(mWrap, xWrap, sWrap, ...logs);
    this.fixedBox.replaceChildren();
    for (const d of v.dims) {
      if (d === this.state.x || d === this.state.series) continue;
      const values = coordsOf(this.run, v, d);
      if (!(d in this.state.fixed) || this.state.fixed[d] >= values.length) this.state.fixed[d] = d === "step" ? values.length - 1 : 0;
      const wrap = el("label", {}, d + " ");
      const out = el("output", {}, String(values[this.state.fixed[d]]));
      if (values.length > 1) {
        const slider = el("input", { type: "range", min: 0, max: values.length - 1, step: 1 });
        slider.value = this.state.fixed[d];
        slider.oninput = () => { self.state.fixed[d] = Number(slider.value); out.textContent = String(values[slider.value]); self.draw(); };
        wrap.appendChild(slider);
      }
      wrap.appendChild(out);
      this.fixedBox.appendChild(wrap);
    }
    this.draw();
  };

  Explorer.prototype.diverged = function (index) {
    const dv = this.run.diverged;
    if (!dv.dims.length) return dv.data[0] === 1;
    const shape = dv.dims.map((d) => this.run.coords[d].length);
    const st = strides(shape);
    let flat = 0;
    dv.dims.forEach((d, k) => { flat += (index[d] || 0) * st[k]; });
    return dv.data[flat] === 1;
  };

  Explorer.prototype.draw = function () {
    const st = this.state, run = this.run, v = run.variables[st.metric];
    const strideOf = {};
    strides(v.shape).forEach((s, k) => { strideOf[v.dims[k]] = s; });
    const xs = coordsOf(run, v, st.x);
    const seriesValues = st.series === "(none)" ? [null] : coordsOf(run, v, st.series);
    const traces = [], crosses = { x: [], y: [], text: [] };
    seriesValues.forEach((sv, j) => {
      const index = Object.assign({}, st.fixed);
      if (st.series !== "(none)") index[st.series] = j;
      const y = [], bad = [];
      xs.forEach((_, i) => {
        index[st.x] = i;
        let flat = 0;
        for (const d of v.dims) flat += (index[d] || 0) * strideOf[d];
        y.push(v.data[flat]);
        bad.push(this.diverged(index));
      });
      const diverged = bad.some(Boolean);
      const name = (st.series === "(none)" ? st.metric : st.series + " = " + sv) + (diverged ? " (diverged)" : "");
      traces.push({
        x: xs, y: y, name: name, type: "scatter", mode: xs.length > 40 ? "lines" : "lines+markers",
        line: { color: PALETTE[j % 8], dash: diverged ? "dot" : DASHES[j % 8], width: 1.6 },
        marker: { symbol: SYMBOLS[j % 8], size: 6, color: PALETTE[j % 8] },
      });
      // A diverged point is crossed: where x is a sweep axis, at its value (at the top of the
      // finite values when it has none); otherwise at the series' last finite point.
      const finite = y.filter((t) => t !== null);
      if (!finite.length || !diverged) return;
      const top = Math.max(...finite);
      const mark = (i, yi) => { crosses.x.push(xs[i]); crosses.y.push(yi); crosses.text.push(name); };
      if (run.diverged.dims.includes(st.x)) {
        bad.forEach((b, i) => { if (b) mark(i, y[i] === null ? top : y[i]); });
      } else {
        let last = y.length - 1;
        while (y[last] === null) last -= 1;
        mark(last, y[last]);
      }
    });
    if (crosses.x.length) {
      traces.push({
        x: crosses.x, y: crosses.y, text: crosses.text, name: "diverged", type: "scatter", mode: "markers",
        marker: { symbol: "x-thin-open", size: 11, color: "#b23c00", line: { width: 2, color: "#b23c00" } },
      });
    }
    const layout = {
      margin: { l: 60, r: 10, t: 30, b: 45 },
      xaxis: { title: { text: st.x }, type: st.logx ? "log" : "linear" },
      yaxis: { title: { text: st.metric }, type: st.logy ? "log" : "linear", exponentformat: "power" },
      legend: { orientation: "v", font: { size: 11 } },
      hovermode: "closest",
    };
    if (typeof xs[0] === "string" || typeof xs[0] === "boolean") layout.xaxis.type = "category";
    Plotly.react(this.plot, traces, layout, { displaylogo: false, responsive: true });
  };

  function start() {
    const status = document.getElementById("report-status");
    let rendered = 0;
    document.querySelectorAll(".explorer").forEach((node) => {
      try {
        new Explorer(node, GRADLAB_RUNS[Number(node.dataset.run)]);
        rendered += 1;
      } catch (e) {
        window.gradlabErrors.push(String(e && e.stack ? e.stack : e));
      }
    });
    status.dataset.rendered = String(rendered);
    status.dataset.errors = String(window.gradlabErrors.length);
    status.textContent = window.gradlabErrors.join("\n");
  }
  start();
})();
