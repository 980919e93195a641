/* A small SVG line chart, one per numeric telemetry field. No library: about a hundred lines.
 * LineChart(container, field) keeps {t: Date, v: number} points, newest last, and redraws. */
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var H = 180, PAD_L = 48, PAD_R = 10, PAD_T = 10, PAD_B = 24;

  function el(name, attrs) {
    var node = document.createElementNS(NS, name);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    return node;
  }

  function fmt(v) {
    var a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-2)) return v.toExponential(2);
    return (Math.round(v * 100) / 100).toString();
  }

  function hhmm(d) { return d.toISOString().slice(11, 19); }

  function LineChart(container, field, maxPoints) {
    this.field = field;
    this.points = [];
    this.maxPoints = maxPoints || 10000;
    this.figure = document.createElement("figure");
    this.figure.className = "chart";
    this.caption = document.createElement("figcaption");
    this.title = document.createElement("span");
    this.title.textContent = field;
    this.latest = document.createElement("span");
    this.latest.className = "mono";
    this.caption.appendChild(this.title);
    this.caption.appendChild(this.latest);
    // Drawn at the figure's own width (no stretching: labels stay legible).
    this.svg = el("svg", { role: "img", height: H });
    this.figure.appendChild(this.caption);
    this.figure.appendChild(this.svg);
    container.appendChild(this.figure);
    this.draw();
  }

  LineChart.prototype.add = function (points) {
    var seen = {};
    this.points.forEach(function (p) { seen[p.t.getTime()] = true; });
    var self = this;
    points.forEach(function (p) { if (!seen[p.t.getTime()]) self.points.push(p); });
    this.points.sort(function (a, b) { return a.t - b.t; });
    if (this.points.length > this.maxPoints) this.points.splice(0, this.points.length - this.maxPoints);
    this.draw();
  };

  LineChart.prototype.keepSince = function (since) {
    this.points = this.points.filter(function (p) { return p.t >= since; });
    this.draw();
  };

  LineChart.prototype.draw = function () {
    var svg = this.svg, pts = this.points;
    var W = Math.max(this.figure.clientWidth || 0, 200);
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    svg.setAttribute("width", W);
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    svg.setAttribute("data-points", String(pts.length));
    var last = pts.length ? pts[pts.length - 1].v : null;
    this.latest.textContent = last === null ? "no data" : fmt(last);
    svg.setAttribute("aria-label", this.field + " chart: " + pts.length + " points" +
                     (last === null ? "" : ", latest " + fmt(last)));
    svg.appendChild(el("line", { x1: PAD_L, y1: H - PAD_B, x2: W - PAD_R, y2: H - PAD_B, "class": "axis" }));
    svg.appendChild(el("line", { x1: PAD_L, y1: PAD_T, x2: PAD_L, y2: H - PAD_B, "class": "axis" }));
    if (!pts.length) return;
    var t0 = pts[0].t.getTime(), t1 = pts[pts.length - 1].t.getTime();
    var lo = Infinity, hi = -Infinity;
    pts.forEach(function (p) { lo = Math.min(lo, p.v); hi = Math.max(hi, p.v); });
    if (hi === lo) { hi += 1; lo -= 1; }
    if (t1 === t0) { t1 += 1000; t0 -= 1000; }
    function x(t) { return PAD_L + (t - t0) / (t1 - t0) * (W - PAD_L - PAD_R); }
    function y(v) { return H - PAD_B - (v - lo) / (hi - lo) * (H - PAD_T - PAD_B); }
    var d = pts.map(function (p, i) {
      return (i ? "L" : "M") + x(p.t.getTime()).toFixed(1) + " " + y(p.v).toFixed(1);
    }).join(" ");
    svg.appendChild(el("path", { d: d, "class": "line" }));
    if (pts.length < 60) {
      pts.forEach(function (p) {
        svg.appendChild(el("circle", { cx: x(p.t.getTime()), cy: y(p.v), r: 2.5, "class": "dot" }));
      });
    }
    var labels = [[PAD_L - 4, PAD_T + 8, fmt(hi), "end"], [PAD_L - 4, H - PAD_B, fmt(lo), "end"],
                  [PAD_L, H - 6, hhmm(new Date(t0)), "start"], [W - PAD_R, H - 6, hhmm(new Date(t1)), "end"]];
    labels.forEach(function (l) {
      var text = el("text", { x: l[0], y: l[1], "text-anchor": l[3] });
      text.textContent = l[2];
      svg.appendChild(text);
    });
  };

  window.LineChart = LineChart;
})();
