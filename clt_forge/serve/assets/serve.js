/* clt serve, browser side: drawing the graph, and what Cytoscape reports to the Dash callbacks.
 *
 * Elements do not travel through Dash: the `graph-meta` store names a drawing (its view key)
 * and this script fetches its elements from the server (/_clt/elements) and hands them to
 * Cytoscape in one batch. The graph a page opens with is fetched (/_clt/initial) as soon as
 * this script runs, in parallel with Dash starting up.
 *
 * Clicks, hovers and selections are handled here rather than through dash-cytoscape's
 * tapNodeData / selectedNodeData props, which re-render the whole graph component: a click
 * fetches the node's panel (/_clt/panel, asked for as the node is pressed) and sets the
 * `clicked` store (the intervention target listens to it), a selection sets `selection`,
 * hovering shows the node's label in a tooltip. When a drawing is on screen and Dash has
 * asked for it, `window.cltServe.ready` records its view key, node and edge counts and time
 * (tests and benchmarks/serve.py wait on it).
 */
(function () {
  "use strict";

  var state = {
    graphKey: null, // the graph file drawn
    shown: null, // the view key drawn (or being drawn)
    asked: null, // the view key Dash asked for last
    drawn: null, // the readiness record of the last drawing on screen
    initial: null, // the opening drawing's fetch
    request: 0, // drawings asked for; a late answer to an older one is dropped
    click: 0, // clicks; a late panel of an older click is dropped
    bound: null, // the Cytoscape instance the handlers are on
    unfitted: null, // the extent to fit once the graph, hidden when it was drawn, is shown
  };

  function setProps(id, props) {
    if (window.dash_clientside && window.dash_clientside.set_props) {
      window.dash_clientside.set_props(id, props);
    }
  }

  function bind(cy) {
    if (state.bound === cy) return;
    state.bound = cy;
    var tip = document.getElementById("hover-tip");
    if (window.ResizeObserver) {
      new ResizeObserver(function () {
        cy.resize();
        // hidden when drawn (error page), or the subgraph below opened or closed: fit again
        var extent = state.unfitted || state.extent;
        if (extent && cy.width() > 0 && cy.height() > 0) fit(cy, extent);
      }).observe(cy.container());
    }
    var selectionTimer = null;

    // A node's panel is asked for when it is pressed and shown when the click completes
    // (tap), so the request overlaps the click. Cytoscape's restyling (selection, highlight)
    // is held in a batch from the press until the panel is in: each restyle redraws the
    // whole canvas, which on a large graph would keep the panel waiting.
    var pressed = null;
    var held = false;
    function hold() {
      if (held) return;
      held = true;
      cy.startBatch();
      setTimeout(release, 800); // a press that never becomes a click
    }
    function release() {
      if (!held) return;
      held = false;
      cy.endBatch();
    }
    function fetchPanel(id) {
      return fetch("_clt/panel", { method: "POST", body: JSON.stringify({ view: state.shown, node: id }) })
        .then(function (response) { return response.text(); });
    }
    // Hovering a node lights its links and their other ends and dims the rest, after a short
    // pause: a pointer passing over, or a click, restyles nothing.
    var hoverTimer = null;
    function unhover() {
      clearTimeout(hoverTimer);
      if (cy.$(".dim").length) cy.batch(function () { cy.$(".dim").removeClass("dim"); cy.$(".near").removeClass("near"); });
    }
    cy.on("mouseover", "node", function (event) {
      var node = event.target;
      if (node.hasClass("axis")) return;
      clearTimeout(hoverTimer);
      hoverTimer = setTimeout(function () {
        var near = node.closedNeighborhood();
        cy.batch(function () {
          cy.elements().not(near).not(".axis").addClass("dim");
          near.removeClass("dim");
          near.nodes().not(node).addClass("near");
        });
      }, 150);
    });
    cy.on("mouseout", "node", unhover);
    cy.container().addEventListener("mouseleave", unhover); // the pointer left the canvas off a node
    cy.on("tapstart", "node", function (event) {
      if (event.target.hasClass("axis")) return;
      unhover();
      hold();
      pressed = { id: event.target.id(), view: state.shown, html: fetchPanel(event.target.id()) };
    });
    cy.on("tap", "node", function (event) {
      var node = event.target;
      if (node.hasClass("axis")) return;
      var click = ++state.click;
      var html = pressed && pressed.id === node.id() && pressed.view === state.shown ? pressed.html : fetchPanel(node.id());
      pressed = null;
      html
        .then(function (text) {
          if (click !== state.click) return;
          document.getElementById("panel").innerHTML = text;
          cy.elements(".hl").removeClass("hl");
          cy.nodes(".clicked").removeClass("clicked");
          node.addClass("clicked");
          node.connectedEdges().addClass("hl");
          setProps("clicked", { data: node.id() });
        })
        .finally(release);
    });
    cy.on("tap", function (event) {
      if (event.target === cy) {
        cy.batch(function () {
          cy.elements(".hl").removeClass("hl");
          cy.nodes(".clicked").removeClass("clicked");
        });
      }
    });
    cy.on("select unselect", "node", function () {
      clearTimeout(selectionTimer);
      selectionTimer = setTimeout(function () {
        var ids = cy.nodes(":selected").not(".axis").map(function (n) { return n.id(); });
        setProps("selection", { data: ids });
      }, 60);
    });
    cy.on("mouseover", "node", function (event) {
      var node = event.target;
      tip = tip || document.getElementById("hover-tip");
      if (!tip || node.hasClass("axis")) return;
      var at = event.renderedPosition || node.renderedPosition();
      tip.textContent = node.data("tip") || node.id();
      tip.style.left = at.x + 14 + "px";
      tip.style.top = at.y + 10 + "px";
      tip.style.display = "block";
    });
    cy.on("mouseout", "node", function () {
      if (tip) tip.style.display = "none";
    });
    cy.on("viewport", function () {
      if (tip) tip.style.display = "none";
      clearTimeout(legibleTimer);
      legibleTimer = setTimeout(function () { legible(cy); }, 150);
    });
    legible(cy);
  }

  /* Labels are drawn only when they are at least LEGIBLE px on screen. Cytoscape compares a
   * label's font size times the zoom *rounded up to a power of two* with min-zoomed-font-size,
   * so that threshold is set, once the zoom settles, to what makes the comparison exact
   * (a restyle: only when it changes by more than 3%). */
  var LEGIBLE = 10.1, legibleTimer = null, legibleMin = LEGIBLE;
  function legible(cy) {
    var zoom = cy.zoom();
    if (!(zoom > 0)) return;
    var ratio = window.devicePixelRatio || 1;
    var rounded = Math.pow(2, Math.ceil(Math.log(zoom * ratio) / Math.LN2));
    var wanted = (LEGIBLE * rounded) / zoom;
    if (Math.abs(wanted / legibleMin - 1) < 0.03) return;
    legibleMin = wanted;
    var sheet = cy.style().json().map(function (rule) {
      if (rule.selector !== "node" || !("min-zoomed-font-size" in rule.style)) return rule;
      var style = Object.assign({}, rule.style, { "min-zoomed-font-size": wanted });
      return { selector: rule.selector, style: style };
    });
    cy.style().fromJson(sheet).update();
  }

  /* Zoom and pan so the model extent [x0, y0, x1, y1] fills the view: the server knows
   * it, and Cytoscape's own fit() would measure every label first. */
  function fit(cy, extent) {
    var pad = 28, width = cy.width(), height = cy.height();
    state.unfitted = width > 0 && height > 0 ? null : extent; // hidden (error page): fit when shown
    if (state.unfitted) return;
    var w = Math.max(extent[2] - extent[0], 1), h = Math.max(extent[3] - extent[1], 1);
    var zoom = Math.min((width - 2 * pad) / w, (height - 2 * pad) / h);
    zoom = Math.max(cy.minZoom(), Math.min(cy.maxZoom(), zoom));
    cy.viewport({
      zoom: zoom,
      pan: { x: (width - zoom * (extent[0] + extent[2])) / 2, y: (height - zoom * (extent[1] + extent[3])) / 2 },
    });
  }

  /* Put a drawing ({key, view, elements, extent}) into Cytoscape; mark it ready once drawn. */
  function show(cy, drawing, request) {
    if (request !== state.request) return; // a newer drawing was asked for meanwhile
    state.shown = drawing.view;
    bind(cy);
    var fresh = state.graphKey !== drawing.key;
    cy.batch(function () {
      if (fresh) {
        cy.elements().remove();
        cy.add(drawing.elements);
      } else {
        cy.json({ elements: drawing.elements }); // keeps elements whose id is unchanged
      }
    });
    if (fresh) {
      state.graphKey = drawing.key;
      state.extent = drawing.extent;
      cy.resize();
      fit(cy, drawing.extent);
    }
    // two frames: the elements are in, and the renderer has drawn them
    requestAnimationFrame(function () {
      requestAnimationFrame(function () {
        if (request !== state.request) return;
        state.drawn = {
          key: drawing.key,
          view: drawing.view,
          nodes: cy.nodes().not(".axis").length,
          edges: cy.edges().length,
          at: performance.now(),
        };
        settle();
        markPinned(pinned());
        refreshSubgraph();
      });
    });
  }

  /* Ready: the drawing Dash asked for (graph-meta) is on screen, so the page's own callbacks
   * for this graph have run too and a click now opens its panel. */
  function settle() {
    if (state.drawn && state.drawn.view === state.asked) {
      window.cltServe.ready = state.drawn;
    }
  }

  function failed(meta, message) {
    window.cltServe.ready = { key: meta.key, view: meta.view, error: message, at: performance.now() };
  }

  function withCy(callback) {
    if (window.cy) callback(window.cy);
    else setTimeout(function () { withCy(callback); }, 10);
  }

  // The opening graph, fetched while Dash starts.
  var first = ++state.request;
  state.initial = fetch("_clt/initial" + window.location.search)
    .then(function (response) { return response.ok ? response.json() : null; })
    .catch(function () { return null; });
  state.initial.then(function (drawing) {
    if (drawing) withCy(function (cy) { show(cy, drawing, first); });
  });

  /* The search box: nodes whose label, hover text, id or token holds the text. */
  function search(text) {
    var cy = window.cy, list = document.getElementById("search-results");
    if (!cy || !list) return;
    var query = (text || "").trim().toLowerCase();
    cy.batch(function () { cy.nodes(".found").removeClass("found"); });
    list.innerHTML = "";
    if (!query) return;
    var found = cy.nodes().not(".axis").filter(function (n) {
      return (n.data("tip") || "").toLowerCase().indexOf(query) >= 0 || n.id().toLowerCase() === query ||
        (n.data("label") || "").toLowerCase().indexOf(query) >= 0;
    });
    cy.batch(function () { found.addClass("found"); });
    found.slice(0, 12).forEach(function (n) {
      var row = document.createElement("div");
      row.className = "search-hit";
      row.dataset.node = n.id();
      var name = document.createElement("span");
      name.textContent = n.data("tip") || n.id();
      name.onclick = function () {
        cy.animate({ center: { eles: n }, zoom: Math.max(cy.zoom(), 1.2) }, { duration: 0 });
        n.emit("tapstart");
        n.emit("tap");
      };
      var pin = document.createElement("button");
      pin.className = "link-btn pin-btn";
      pin.textContent = "pin";
      pin.title = "pin into the subgraph";
      pin.onclick = function () { window.cltServe.pin([n.id()]); };
      row.appendChild(name);
      row.appendChild(pin);
      list.appendChild(row);
    });
    var more = document.createElement("div");
    more.className = "muted";
    more.textContent = found.length + " found";
    list.appendChild(more);
  }
  document.addEventListener("input", function (event) {
    if (event.target && event.target.id === "search") search(event.target.value);
  });

  /* Pins: the ids pinned into the subgraph (the `pinned` store, saved as qParams.pinnedIds). */
  function pinned() {
    return state.pinned || [];
  }
  function markPinned(ids) {
    var cy = window.cy;
    if (!cy) return;
    cy.batch(function () {
      cy.nodes(".pinned").removeClass("pinned");
      ids.forEach(function (id) { cy.getElementById(id).addClass("pinned"); });
    });
  }

  /* The subgraph: pinned nodes by layer and position, drawn as SVG from /_clt/subgraph. */
  var SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, parent) {
    var element = document.createElementNS(SVG, tag);
    Object.keys(attrs).forEach(function (k) { element.setAttribute(k, attrs[k]); });
    if (parent) parent.appendChild(element);
    return element;
  }
  function drawSubgraph(drawing) {
    var box = document.getElementById("subgraph");
    if (!box) return;
    box.innerHTML = "";
    var card = document.getElementById("subgraph-card");
    if (card) card.classList.toggle("has-pins", !!(drawing && drawing.nodes && drawing.nodes.length));
    if (!drawing || !drawing.nodes || !drawing.nodes.length) {
      box.innerHTML = '<div class="muted sub-empty">Pin nodes (click a node, then “Pin”, or search) to build a subgraph.</div>';
      window.cltServe.subgraph = { nodes: 0, edges: 0, at: performance.now() };
      return;
    }
    var root = svg("svg", { viewBox: drawing.viewBox.join(" "), preserveAspectRatio: "xMidYMid meet", class: "sub-svg" }, box);
    // a small subgraph is drawn at most 1.25 times its size, not blown up to the whole card
    root.style.maxWidth = 1.25 * drawing.viewBox[2] + "px";
    root.style.maxHeight = 1.25 * drawing.viewBox[3] + "px";
    root.style.margin = "0 auto";
    var at = {};
    drawing.nodes.forEach(function (n) { at[n.id] = n; });
    drawing.links.forEach(function (l) {
      var a = at[l.source], b = at[l.target];
      var line = svg("line", { x1: a.x, y1: a.y, x2: b.x, y2: b.y, stroke: l.c, "stroke-width": l.w, "stroke-opacity": l.o, class: "sub-link" }, root);
      line.dataset.source = l.source;
      line.dataset.target = l.target;
      line.dataset.weight = l.weight;
    });
    drawing.nodes.forEach(function (n) {
      var g = svg("g", { class: "sub-node " + n.kind, transform: "translate(" + (n.x - n.w / 2) + "," + (n.y - n.h / 2) + ")" }, root);
      g.dataset.node = n.id;
      svg("rect", { width: n.w, height: n.h, rx: 4, fill: n.fill, stroke: n.stroke }, g);
      var text = svg("text", { x: n.w / 2, y: n.h / 2 + 4, "text-anchor": "middle", fill: n.ink, class: "sub-label" }, g);
      text.textContent = n.label;
      // a label wider than its box (a wide font) is shortened until it fits: it never reaches a neighbour
      var shown = n.label;
      while (shown.length > 1 && text.getComputedTextLength() > n.w - 8) {
        shown = shown.slice(0, -2) + "…";
        text.textContent = shown;
      }
      svg("title", {}, g).textContent = n.tip;
      g.addEventListener("click", function () {
        fetch("_clt/panel", { method: "POST", body: JSON.stringify({ view: state.shown, node: n.id }) })
          .then(function (r) { return r.text(); })
          .then(function (html) {
            document.getElementById("panel").innerHTML = html;
            root.querySelectorAll(".sub-node.clicked").forEach(function (e) { e.classList.remove("clicked"); });
            g.classList.add("clicked");
            setProps("clicked", { data: n.id });
            if (n.kind === "cluster") setProps("target", { value: n.id });
          });
      });
    });
    window.cltServe.subgraph = { nodes: drawing.nodes.length, edges: drawing.links.length, at: performance.now() };
  }
  function refreshSubgraph() {
    if (!state.shown) return;
    fetch("_clt/subgraph", { method: "POST", body: JSON.stringify({ view: state.shown, pinned: pinned() }) })
      .then(function (r) { return r.json(); })
      .then(drawSubgraph);
  }

  window.cltServe = {
    ready: null,
    subgraph: null,
    search: search,
    /* Pin `ids` (the store's callback saves them into the graph file). */
    pin: function (ids) {
      var now = pinned().slice();
      ids.forEach(function (id) { if (now.indexOf(id) < 0) now.push(id); });
      setProps("pinned", { data: now });
    },
    /* The pinned store changed (opened, pinned, unpinned): mark and redraw. */
    onPinned: function (ids, view) {
      state.pinned = ids || [];
      markPinned(state.pinned);
      refreshSubgraph();
      return state.pinned.length;
    },
    onGraph: function (meta) {
      if (!meta || !meta.key) {
        state.request++;
        state.graphKey = null;
        state.shown = null;
        window.cltServe.ready = { key: null, error: meta ? meta.error : null, at: performance.now() };
        return meta ? meta.error || null : null;
      }
      state.asked = meta.view;
      if (state.shown === meta.view) {
        settle();
        return meta.view;
      }
      var request = ++state.request;
      state.initial.then(function (drawing) {
        if (drawing && drawing.view === meta.view) {
          withCy(function (cy) { show(cy, drawing, request); });
          return;
        }
        fetch("_clt/elements", { method: "POST", body: meta.view, headers: { "Content-Type": "application/json" } })
          .then(function (response) { return response.json(); })
          .then(function (drawing) {
            if (drawing.error) return failed(meta, drawing.error);
            withCy(function (cy) { show(cy, Object.assign({ key: meta.key, view: meta.view }, drawing), request); });
          });
      });
      return meta.view;
    },
    /* Write server-rendered HTML (clt_forge/serve/panel.py, escaped there) into an element. */
    fill: function (id, html) {
      var element = document.getElementById(id);
      if (element && typeof html === "string") element.innerHTML = html;
      return window.dash_clientside.no_update;
    },
    /* Where a node is on screen, in page pixels (for tests and the benchmark). */
    nodePosition: function (id) {
      var cy = window.cy;
      var node = cy.getElementById(id);
      if (!node || node.empty()) return null;
      var box = cy.container().getBoundingClientRect();
      var at = node.renderedPosition();
      return { x: box.left + at.x, y: box.top + at.y };
    },
  };
})();
