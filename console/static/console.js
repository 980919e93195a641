/* The console's scripts: the API with the session's CSRF token, live updates over
 * Server-Sent Events, the devices list, one device's charts and command form. */
var Console = (function () {
  "use strict";

  function csrf() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") : "";
  }

  function api(method, path, body) {
    var options = { method: method, credentials: "same-origin",
                    headers: { "Accept": "application/json", "X-CSRF-Token": csrf() } };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    return fetch(path, options).then(function (response) {
      return response.text().then(function (text) {
        var data = text ? JSON.parse(text) : null;
        if (!response.ok) {
          if (response.status === 401) window.location = "/login?next=" + encodeURIComponent(location.pathname);
          throw new Error((data && data.detail) || response.statusText);
        }
        return data;
      });
    });
  }

  function live(handlers) {
    var status = document.getElementById("live-status");
    var source = new EventSource("/api/events");
    source.onopen = function () { if (status) status.textContent = "Live: updates appear as they happen."; };
    source.onerror = function () { if (status) status.textContent = "Live updates interrupted; reconnecting…"; };
    Object.keys(handlers).forEach(function (kind) {
      source.addEventListener(kind, function (e) { handlers[kind](JSON.parse(e.data)); });
    });
    return source;
  }

  function text(node, value) { if (node) node.textContent = value; }

  function stamp(iso) {
    if (!iso) return "never";
    return iso.replace("T", " ").slice(0, 19);
  }

  function confirmForms() {
    document.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (e) {
        if (!window.confirm(form.getAttribute("data-confirm"))) e.preventDefault();
      });
    });
  }

  // -- the devices list ------------------------------------------------------------

  function deviceRow(d) {
    var tr = document.createElement("tr");
    tr.setAttribute("data-device", d.id);
    var th = document.createElement("th");
    th.scope = "row";
    var a = document.createElement("a");
    a.href = "/devices/" + encodeURIComponent(d.id);
    a.textContent = d.id;
    th.appendChild(a);
    tr.appendChild(th);
    var cells = [["presence", null], ["transport", d.transport || "–"],
                 ["last-seen", stamp(d.last_seen)], ["hub", d.hub || "–"]];
    cells.forEach(function (c) {
      var td = document.createElement("td");
      if (c[0] === "presence") {
        var span = document.createElement("span");
        span.setAttribute("data-presence", "");
        td.appendChild(span);
      } else {
        td.setAttribute("data-" + c[0], "");
        td.textContent = c[1];
      }
      tr.appendChild(td);
    });
    setPresence(tr, d.online);
    return tr;
  }

  function setPresence(row, online) {
    var span = row.querySelector("[data-presence]");
    span.className = "presence " + (online ? "on" : "off");
    span.textContent = online ? "online" : "offline";
  }

  function devicesPage() {
    var form = document.getElementById("device-search");
    var q = document.getElementById("q");
    var online = document.getElementById("online");
    var rows = document.getElementById("device-rows");
    var timer = null;

    function countOnline() {
      text(document.getElementById("online-count"),
           String(rows.querySelectorAll(".presence.on").length));
    }

    function reload() {
      var params = new URLSearchParams({ prefix: q.value, limit: "50" });
      if (online.value === "yes") params.set("online", "true");
      if (online.value === "no") params.set("online", "false");
      history.replaceState(null, "", "/devices?q=" + encodeURIComponent(q.value) + "&online=" + online.value);
      return api("GET", "/api/devices?" + params).then(function (page) {
        rows.innerHTML = "";
        page.items.forEach(function (d) { rows.appendChild(deviceRow(d)); });
        if (!page.items.length) {
          var tr = document.createElement("tr");
          tr.className = "empty";
          tr.innerHTML = "<td colspan='5'></td>";
          tr.firstChild.textContent = "No devices match.";
          rows.appendChild(tr);
        }
        countOnline();
        text(document.getElementById("total-count"), String(page.total));
      });
    }

    form.addEventListener("submit", function (e) { e.preventDefault(); reload(); });
    q.addEventListener("input", function () { clearTimeout(timer); timer = setTimeout(reload, 250); });
    online.addEventListener("change", reload);

    live({
      presence: function (e) {
        var row = rows.querySelector('tr[data-device="' + CSS.escape(e.device) + '"]');
        var filtered = online.value === "yes" ? !e.online : online.value === "no" ? e.online : false;
        if (!row) {
          if (e.device.indexOf(q.value) === 0 && !filtered) reload();
          return;
        }
        setPresence(row, e.online);
        text(row.querySelector("[data-hub]"), e.hub || "–");
        if (e.transport) text(row.querySelector("[data-transport]"), e.transport);
        row.classList.remove("flash"); void row.offsetWidth; row.classList.add("flash");
        countOnline();
      },
      telemetry: function (e) {
        var row = rows.querySelector('tr[data-device="' + CSS.escape(e.device) + '"]');
        if (row) text(row.querySelector("[data-last-seen]"), stamp(e.at));
      },
      overflow: function () { reload(); }
    });
  }

  // -- one device ------------------------------------------------------------------

  function devicePage(deviceId) {
    var base = "/api/devices/" + encodeURIComponent(deviceId);
    var chartsNode = document.getElementById("charts");
    var range = document.getElementById("range");
    var note = document.getElementById("chart-note");
    var charts = {};
    var newest = null;

    function numericFields(values) {
      return Object.keys(values).filter(function (k) {
        return typeof values[k] === "number";
      });
    }

    function addRows(items) {
      items.forEach(function (row) {
        var t = new Date(row.received_at);
        if (!newest || t > newest) newest = t;
        numericFields(row.values).forEach(function (field) {
          if (!charts[field]) charts[field] = new LineChart(chartsNode, field);
        });
      });
      Object.keys(charts).sort().forEach(function (field) {
        charts[field].add(items.filter(function (r) { return typeof r.values[field] === "number"; })
          .map(function (r) { return { t: new Date(r.received_at), v: r.values[field] }; }));
      });
      text(note, Object.keys(charts).length ? "" : "No numeric telemetry in this time range yet.");
    }

    function loadRange() {
      var since = new Date(Date.now() - Number(range.value) * 1000);
      Object.keys(charts).forEach(function (f) { charts[f].keepSince(since); });
      return api("GET", base + "/telemetry?limit=10000&since=" + encodeURIComponent(since.toISOString()))
        .then(function (page) { addRows(page.items); });
    }

    var fetching = false, again = false;
    function loadNewer() {
      if (fetching) { again = true; return; }
      fetching = true;
      var since = newest ? newest : new Date(Date.now() - Number(range.value) * 1000);
      api("GET", base + "/telemetry?limit=10000&since=" + encodeURIComponent(since.toISOString()))
        .then(function (page) { addRows(page.items); })
        .finally(function () { fetching = false; if (again) { again = false; loadNewer(); } });
    }

    range.addEventListener("change", loadRange);
    loadRange();

    var reply = document.getElementById("command-reply");
    var waiting = {};

    function showOutcome(cmd) {
      var row = document.querySelector('tr[data-command="' + cmd.id + '"] [data-status]');
      if (row) { row.textContent = cmd.status; row.className = "status " + cmd.status; }
      if (!waiting[cmd.id]) return;
      if (cmd.status === "pending" || cmd.status === "delivered") {
        reply.innerHTML = "";
        var p = document.createElement("p");
        p.textContent = cmd.name + ": " + cmd.status + ", waiting for the device's reply…";
        reply.appendChild(p);
        return;
      }
      delete waiting[cmd.id];
      reply.innerHTML = "";
      var head = document.createElement("p");
      head.innerHTML = "<strong></strong> <span></span>";
      head.firstChild.textContent = "Reply to " + cmd.name + ":";
      head.lastChild.className = "status " + cmd.status;
      head.lastChild.textContent = cmd.status;
      reply.appendChild(head);
      var pre = document.createElement("pre");
      pre.textContent = cmd.error ? cmd.error : JSON.stringify(cmd.result, null, 2);
      reply.appendChild(pre);
    }

    function follow(id) {
      api("GET", "/api/commands/" + id).then(function (cmd) {
        showOutcome(cmd);
        if (waiting[id]) setTimeout(function () { if (waiting[id]) follow(id); }, 3000);
      });
    }

    var form = document.getElementById("command-form");
    if (form) {
      form.addEventListener("submit", function (e) {
        e.preventDefault();
        var args;
        try { args = JSON.parse(document.getElementById("command-args").value || "{}"); }
        catch (err) { reply.textContent = "The arguments are not JSON: " + err.message; return; }
        reply.textContent = "Sending…";
        api("POST", base + "/commands", { name: document.getElementById("command-name").value, args: args, ttl: Number(document.getElementById("command-ttl").value) })
          .then(function (accepted) {
            waiting[accepted.id] = true;
            var tbody = document.getElementById("command-rows");
            var empty = tbody.querySelector("tr.empty");
            if (empty) empty.remove();
            var tr = document.createElement("tr");
            tr.setAttribute("data-command", accepted.id);
            tr.innerHTML = "<td></td><td></td><td><span class='status pending' data-status>pending</span></td><td class='mono'></td>";
            tr.children[0].textContent = new Date().toISOString().slice(11, 19);
            tr.children[1].textContent = document.getElementById("command-name").value;
            tr.children[3].textContent = accepted.id.slice(0, 12);
            tbody.insertBefore(tr, tbody.firstChild);
            follow(accepted.id);
          })
          .catch(function (err) { reply.textContent = "Not sent: " + err.message; });
      });
    }

    live({
      presence: function (e) {
        if (e.device !== deviceId) return;
        var node = document.getElementById("presence");
        node.className = "presence " + (e.online ? "on" : "off");
        node.textContent = e.online ? "online" : "offline";
        text(document.getElementById("hub"), e.hub || "–");
        if (e.transport) text(document.getElementById("transport"), e.transport);
      },
      telemetry: function (e) {
        if (e.device !== deviceId) return;
        text(document.getElementById("last-seen"), stamp(e.at) + " UTC");
        text(document.getElementById("last-values"), JSON.stringify(e.values, null, 2));
        loadNewer();
      },
      command: function (e) {
        if (e.device !== deviceId) return;
        api("GET", "/api/commands/" + e.id).then(showOutcome);
      },
      overflow: function () { loadNewer(); }
    });
  }

  document.addEventListener("DOMContentLoaded", confirmForms);
  return { api: api, live: live, devicesPage: devicesPage, devicePage: devicePage };
})();
