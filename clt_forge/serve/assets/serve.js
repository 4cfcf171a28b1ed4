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
        if (state.unfitted && cy.width() > 0 && cy.height() > 0) fit(cy, state.unfitted);
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
    cy.on("tapstart", "node", function (event) {
      if (event.target.hasClass("axis")) return;
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
    });
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

  window.cltServe = {
    ready: null,
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
