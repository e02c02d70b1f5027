// The graph viewer of gelutrace's pages ({m}_trace_graph.html, {m}_causal_graph.html), inlined by
// gelutrace/report/viewer.py after d3 and the page's data (script#gelutrace-data, described in viewer.py).
// Nodes sit in cells, one per (row, column): prompt positions or layers along x, layers up y; within a cell in the
// order of the data, a few to a line. Links are SVG paths (path.link) in a small graph, lines on a canvas under
// the SVG in a large one. Every text is inserted as text, never as HTML.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("gelutrace-data").textContent);
  const N = data.nodes, L = data.links;
  const nNodes = N.id.length, nLinks = L.source.length;
  const lay = Object.assign({cellWidth: 60, spacing: 10, perLine: 4, maxPerLine: 40, labels: false, svgLinks: 2000},
    data.layout);
  const LABEL_CHARS = 40;  // a node label drawn beside its node is cut here (its card and tooltip hold it whole)
  const margin = {left: 90, right: 20, top: 20, bottom: 90};
  const useSvgLinks = nLinks <= lay.svgLinks;

  // --- layout -------------------------------------------------------------------------------------------------
  const nCols = data.columns.length, nRows = data.rows.length;
  const cells = new Map();  // "row,col" -> node indices, in data order
  for (let i = 0; i < nNodes; i++) {
    const key = N.row[i] + "," + N.col[i];
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(i);
  }
  // a column as wide as its fullest cell needs (up to maxPerLine nodes a line), a row as high as its fullest cell
  const perLine = new Array(nCols).fill(lay.perLine);
  if (!lay.labels) {
    for (const [key, members] of cells) {
      const col = +key.split(",")[1];
      perLine[col] = Math.max(perLine[col], Math.min(lay.maxPerLine, Math.ceil(Math.sqrt(2 * members.length))));
    }
  }
  const colWidth = perLine.map(n => (lay.labels ? lay.cellWidth : Math.max(lay.cellWidth, (n + 1) * lay.spacing)));
  const colLeft = [];
  let x0 = margin.left;
  for (let c = 0; c < nCols; c++) { colLeft.push(x0); x0 += colWidth[c]; }
  const lines = new Array(nRows).fill(1);
  for (const [key, members] of cells) {
    const [row, col] = key.split(",").map(Number);
    lines[row] = Math.max(lines[row], Math.ceil(members.length / perLine[col]));
  }
  const rowHeight = lines.map(n => n * lay.spacing + 2 * lay.spacing);
  const plotHeight = rowHeight.reduce((a, b) => a + b, 0);
  const rowBase = [];  // the bottom of each row, in SVG coordinates (rows go up)
  let y0 = margin.top + plotHeight;
  for (let r = 0; r < nRows; r++) { rowBase.push(y0); y0 -= rowHeight[r]; }
  const width = x0 + margin.right;
  const height = margin.top + plotHeight + margin.bottom;
  const X = new Float64Array(nNodes), Y = new Float64Array(nNodes);
  for (const [key, members] of cells) {
    const [row, col] = key.split(",").map(Number);
    const n = perLine[col];
    members.forEach((i, k) => {
      const line = Math.floor(k / n), slot = k % n;
      const inLine = Math.min(n, members.length - line * n);
      X[i] = colLeft[col] + (lay.labels ? 2 * lay.spacing
                                        : colWidth[col] / 2 + (slot - (inLine - 1) / 2) * lay.spacing);
      // with labels a column reads from the top down; otherwise a cell fills from its row's bottom up
      Y[i] = lay.labels ? rowBase[row] - rowHeight[row] + lay.spacing * (1 + line)
                        : rowBase[row] - lay.spacing * (1.5 + line);
    });
  }
  const maxSize = Math.max(1e-30, ...N.size.map(Math.abs));
  const radius = i => (lay.labels ? 4 : 1.5) + (lay.labels ? 6 : 3.5) * Math.sqrt(Math.abs(N.size[i]) / maxSize);
  let maxWeight = 1e-30;
  for (let j = 0; j < nLinks; j++) maxWeight = Math.max(maxWeight, Math.abs(L.weight[j]));
  const linkWidth = j => 0.3 + 2.7 * Math.sqrt(Math.abs(L.weight[j]) / maxWeight);
  const POSITIVE = "#2166ac", NEGATIVE = "#b2182b";
  const TYPE_FILL = {neuron: "#9ecae1", other: "#cccccc", embedding: "#a1d99b", logit: "#fdae6b"};

  // --- the page's elements ------------------------------------------------------------------------------------
  document.getElementById("title").textContent = data.title;
  document.getElementById("subtitle").textContent = data.subtitle;
  const view = d3.select("#view");
  const canvas = view.append("canvas").attr("id", "links-canvas").attr("width", width).attr("height", height)
    .style("width", width + "px").style("height", height + "px");
  const svg = view.append("svg").attr("id", "graph").attr("width", width).attr("height", height);
  const axis = svg.append("g").attr("class", "axis");
  data.columns.forEach((text, c) => {
    const x = colLeft[c] + colWidth[c] / 2;
    axis.append("text").attr("class", "column-label")
      .attr("transform", `translate(${x},${margin.top + plotHeight + 12}) rotate(-40)`)
      .attr("text-anchor", "end").text(text);
  });
  data.rows.forEach((text, r) => {
    axis.append("line").attr("x1", margin.left).attr("x2", width - margin.right)
      .attr("y1", rowBase[r]).attr("y2", rowBase[r]).attr("class", "row-line");
    axis.append("text").attr("class", "row-label").attr("x", margin.left - 8)
      .attr("y", rowBase[r] - rowHeight[r] / 2).attr("text-anchor", "end").text(text);
  });
  const groupLayer = svg.append("g").attr("class", "supernodes");
  const linkLayer = svg.append("g").attr("class", "links");
  const highlightLayer = svg.append("g").attr("class", "highlight");
  const nodeLayer = svg.append("g").attr("class", "nodes");

  const colour = d3.scaleOrdinal(d3.schemeTableau10);
  const groups = groupLayer.selectAll("g.supernode").data(data.supernodes).join("g")
    .attr("class", "supernode").attr("data-name", d => d.name);
  groups.each(function (d, k) {
    const g = d3.select(this);
    g.selectAll("circle").data(d.members).join("circle").attr("class", "halo")
      .attr("cx", i => X[i]).attr("cy", i => Y[i]).attr("r", i => radius(i) + 4)
      .attr("fill", colour(k)).attr("fill-opacity", 0.35).attr("stroke", colour(k));
    const top = d.members.reduce((a, b) => (Y[b] < Y[a] ? b : a), d.members[0]);
    g.append("text").attr("class", "supernode-label").attr("x", X[top] + 6).attr("y", Y[top] - 8)
      .attr("fill", d3.color(colour(k)).darker(1.5)).text(d.name);
  });

  const nodes = nodeLayer.selectAll("g.node").data(d3.range(nNodes)).join("g")
    .attr("class", "node").attr("data-id", i => N.id[i]).attr("transform", i => `translate(${X[i]},${Y[i]})`);
  nodes.append(i => document.createElementNS(d3.namespaces.svg, N.type[i] === "other" ? "rect" : "circle"))
    .attr("class", "shape");
  nodes.select("circle.shape").attr("r", radius);
  nodes.select("rect.shape").attr("x", i => -radius(i)).attr("y", i => -radius(i))
    .attr("width", i => 2 * radius(i)).attr("height", i => 2 * radius(i));
  nodes.selectAll(".shape").attr("fill", i => TYPE_FILL[N.type[i]] || "#999");
  nodes.append("title").text(i => N.label[i]);
  if (lay.labels) {
    nodes.append("text").attr("class", "node-label").attr("x", i => radius(i) + 3).attr("y", 3)
      .text(i => (N.label[i].length > LABEL_CHARS ? N.label[i].slice(0, LABEL_CHARS - 1) + "…" : N.label[i]));
    nodes.each(function (i) {  // the label clicks as the node does: a transparent box under both
      const g = d3.select(this), r = radius(i);
      const w = g.select("text.node-label").node().getComputedTextLength();
      g.insert("rect", ":first-child").attr("class", "hit").attr("x", -r).attr("y", -Math.max(r, 7))
        .attr("width", 2 * r + 3 + w).attr("height", 2 * Math.max(r, 7)).attr("fill", "transparent");
    });
  }

  // --- pruning ------------------------------------------------------------------------------------------------
  const shown = new Uint8Array(nNodes), drawn = new Uint8Array(nLinks);
  let nodeThreshold = data.thresholds.node, edgeThreshold = data.thresholds.edge;
  const pinned = new Set(data.pinned), byId = new Map(N.id.map((id, i) => [id, i]));
  let selected = -1;

  function prune() {
    for (let i = 0; i < nNodes; i++) shown[i] = N.share[i] <= nodeThreshold ? 1 : 0;
    for (let j = 0; j < nLinks; j++) {
      drawn[j] = shown[L.source[j]] && shown[L.target[j]] && L.share[j] <= edgeThreshold ? 1 : 0;
    }
  }

  function drawLinks() {
    const ctx = canvas.node().getContext("2d");
    ctx.clearRect(0, 0, width, height);
    if (useSvgLinks) {
      const kept = d3.range(nLinks).filter(j => drawn[j]);
      kept.sort((a, b) => Math.abs(L.weight[a]) - Math.abs(L.weight[b]));  // the strongest on top
      linkLayer.selectAll("path.link").data(kept, j => j).join("path").attr("class", "link")
        .attr("data-source", j => N.id[L.source[j]]).attr("data-target", j => N.id[L.target[j]])
        .attr("d", j => `M${X[L.source[j]]},${Y[L.source[j]]}L${X[L.target[j]]},${Y[L.target[j]]}`)
        .attr("stroke", j => (L.weight[j] >= 0 ? POSITIVE : NEGATIVE)).attr("stroke-width", linkWidth)
        .attr("stroke-opacity", 0.6).attr("fill", "none").order();
      return;
    }
    const BUCKETS = 6, paths = [];  // one path per (sign, width bucket): a few strokes for every link
    for (let b = 0; b < 2 * BUCKETS; b++) paths.push(new Path2D());
    for (let j = 0; j < nLinks; j++) {
      if (!drawn[j]) continue;
      const b = Math.min(BUCKETS - 1, Math.floor(BUCKETS * Math.sqrt(Math.abs(L.weight[j]) / maxWeight)));
      const p = paths[(L.weight[j] >= 0 ? 0 : BUCKETS) + b];
      p.moveTo(X[L.source[j]], Y[L.source[j]]);
      p.lineTo(X[L.target[j]], Y[L.target[j]]);
    }
    for (let b = 0; b < 2 * BUCKETS; b++) {
      const level = b % BUCKETS;
      ctx.strokeStyle = b < BUCKETS ? POSITIVE : NEGATIVE;
      ctx.lineWidth = 0.3 + 2.7 * (level + 0.5) / BUCKETS;
      ctx.globalAlpha = 0.08 + 0.6 * level / (BUCKETS - 1);
      ctx.stroke(paths[b]);
    }
    ctx.globalAlpha = 1;
  }

  function drawHighlight() {
    const incident = [];
    if (selected >= 0 && shown[selected]) {
      for (let j = 0; j < nLinks; j++) {
        if (drawn[j] && (L.source[j] === selected || L.target[j] === selected)) incident.push(j);
      }
    }
    highlightLayer.selectAll("line").data(incident).join("line").attr("class", "link-highlight")
      .attr("x1", j => X[L.source[j]]).attr("y1", j => Y[L.source[j]])
      .attr("x2", j => X[L.target[j]]).attr("y2", j => Y[L.target[j]])
      .attr("stroke", j => (L.weight[j] >= 0 ? POSITIVE : NEGATIVE)).attr("stroke-width", j => 1 + linkWidth(j));
  }

  function draw() {
    prune();
    nodes.style("display", i => (shown[i] ? null : "none"))
      .classed("pinned", i => pinned.has(N.id[i])).classed("selected", i => i === selected);
    groups.style("display", d => (d.members.some(i => shown[i]) ? null : "none"));
    groups.selectAll("circle.halo").style("display", i => (shown[i] ? null : "none"));
    drawLinks();
    drawHighlight();
    d3.select("#counts").text(`${d3.sum(shown)} nodes, ${d3.sum(drawn)} links drawn ` +
      `(of ${nNodes} and ${nLinks})`);
  }

  // --- controls -----------------------------------------------------------------------------------------------
  function slider(id, get, set) {
    const input = document.getElementById(id), out = document.getElementById(id + "-value");
    input.value = String(get());
    out.textContent = get().toFixed(3);
    input.addEventListener("input", () => { set(+input.value); out.textContent = get().toFixed(3); draw(); });
    return input;
  }
  const nodeSlider = slider("node-threshold", () => nodeThreshold, v => { nodeThreshold = v; });
  const edgeSlider = slider("edge-threshold", () => edgeThreshold, v => { edgeThreshold = v; });

  // --- the card -----------------------------------------------------------------------------------------------
  const card = d3.select("#card");

  function tokenList(cls, title, tokens) {
    if (!tokens || !tokens.length) return;
    const p = card.append("div").attr("class", cls);
    p.append("span").attr("class", "card-heading").text(title + ": ");
    p.selectAll("span.token").data(tokens).join("span").attr("class", "token")
      .attr("title", t => (t[1] >= 0 ? "+" : "") + t[1].toPrecision(3)).text(t => t[0]);
  }

  function showCard(i) {
    card.selectAll("*").remove();
    if (i < 0) { card.append("p").attr("class", "hint").text(data.hint); return; }
    card.append("div").attr("class", "card-label").text(N.label[i]);
    const facts = [N.type[i], "influence " + (+N.influence[i]).toPrecision(3)];
    if (N.activation[i] !== null) facts.push("activation " + (+N.activation[i]).toPrecision(3));
    card.append("div").attr("class", "card-facts").text(facts.join(" · "));
    card.append("button").attr("id", "pin").attr("type", "button")
      .text(pinned.has(N.id[i]) ? "unpin" : "pin").on("click", () => togglePin(i));
    const c = N.card[i] >= 0 ? data.cards[N.card[i]] : null;
    if (!c) return;
    if (c.module) card.append("div").attr("class", "card-module").text(c.module);
    if (c.figures) card.append("div").attr("class", "card-figures").text(c.figures);
    if (c.examples.length) card.append("div").attr("class", "card-heading").text("Top examples");
    const top = Math.max(1e-30, ...c.examples.flatMap(e => e.acts));
    for (const e of c.examples) {
      const div = card.append("div").attr("class", "card-example").attr("title", "value " + e.value.toPrecision(4));
      div.selectAll("span.tok").data(e.tokens.map((t, k) => [t, e.acts[k]])).join("span").attr("class", "tok")
        .attr("title", d => (d[1] === undefined ? "" : d[1].toPrecision(3))).text(d => d[0])
        .style("background", d => `rgba(255, 140, 0, ${Math.max(0, Math.min(1, (d[1] || 0) / top)).toFixed(3)})`);
      if (e.next !== null) div.append("span").attr("class", "next").text(e.next);
    }
    tokenList("card-promoted", "Promoted", c.promoted);
    tokenList("card-suppressed", "Suppressed", c.suppressed);
  }

  function select(i) {
    selected = i;
    nodes.classed("selected", k => k === selected);
    showCard(i);
    drawHighlight();
  }

  function togglePin(i) {
    const id = N.id[i];
    if (pinned.has(id)) pinned.delete(id); else pinned.add(id);
    nodes.classed("pinned", k => pinned.has(N.id[k]));
    if (i === selected) d3.select("#pin").text(pinned.has(id) ? "unpin" : "pin");
  }

  nodes.on("click", (event, i) => { if (event.shiftKey) togglePin(i); else select(i); });

  window.gelutraceViewer = {
    drawnNodes: () => d3.range(nNodes).filter(i => shown[i]).map(i => N.id[i]),
    drawnLinks: () => d3.range(nLinks).filter(j => drawn[j]).map(j => [N.id[L.source[j]], N.id[L.target[j]]]),
    setThresholds(node, edge) {
      nodeThreshold = +node; edgeThreshold = +edge;
      nodeSlider.value = String(nodeThreshold); edgeSlider.value = String(edgeThreshold);
      document.getElementById("node-threshold-value").textContent = nodeThreshold.toFixed(3);
      document.getElementById("edge-threshold-value").textContent = edgeThreshold.toFixed(3);
      draw();
    },
    select(id) {
      if (!byId.has(String(id))) throw new Error("no node " + id);
      select(byId.get(String(id)));
    },
    pinned: () => Array.from(pinned),
  };

  showCard(-1);
  draw();
  // the layers' names stay at the left edge of what is in view, however far the view is scrolled
  const rowLabels = axis.selectAll("text.row-label");
  view.on("scroll", () => rowLabels.attr("x", view.node().scrollLeft + margin.left - 8));
  if (data.kind === "trace") view.node().scrollLeft = width;  // the last position, which predicts, in view
  document.body.dataset.ready = "1";
})();
