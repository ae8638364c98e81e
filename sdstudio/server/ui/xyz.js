// X/Y/Z plot: up to three axes (A1111's types and value syntax) over the tab's parameters. The server
// checks every cell, queues each as a job, and the grid fills in here as they finish.

import { get, notify, post } from "./api.js";

const LETTERS = ["x", "y", "z"];

export class XyzPlot {
  constructor(details, view, tab) {
    this.tab = tab;
    this.view = view; // where the grid is drawn
    this.body = document.createElement("div");
    this.body.className = "grid";
    for (const letter of LETTERS) {
      const L = letter.toUpperCase();
      const type = document.createElement("div");
      type.className = "field";
      type.innerHTML = `<label for="${tab.kind}-xyz-${letter}-type">${L} type</label>
        <select id="${tab.kind}-xyz-${letter}-type" name="${letter}_type"><option>Nothing</option></select>`;
      const values = document.createElement("div");
      values.className = "field xyz-values";
      values.innerHTML = `<label for="${tab.kind}-xyz-${letter}-values">${L} values</label>
        <input id="${tab.kind}-xyz-${letter}-values" name="${letter}_values" placeholder="1-5, 10 or a, b">`;
      this.body.append(type, values);
    }
    const go = document.createElement("button");
    go.type = "button";
    go.textContent = "Generate grid";
    go.addEventListener("click", () => this.run());
    const row = document.createElement("div");
    row.className = "row";
    row.append(go);
    details.append(this.body, row);
    details.addEventListener("toggle", () => details.open && this.loadTypes());
  }

  async loadTypes() {
    if (this.types) return;
    try {
      this.types = await get("/sdapi/v2/grids/axes");
    } catch (e) {
      notify(`X/Y/Z plot: ${e.message}`);
      return;
    }
    for (const select of this.body.querySelectorAll("select")) {
      select.replaceChildren(...this.types.map((t) => new Option(t, t)));
    }
  }

  async run() {
    notify("");
    let grid;
    try {
      const payload = { kind: this.tab.kind, ...this.tab.payload() };
      for (const el of this.body.querySelectorAll("select, input")) payload[el.name] = el.value;
      grid = await post("/sdapi/v2/grids", payload);
    } catch (e) {
      notify(e.message);
      return;
    }
    this.draw(grid);
  }

  draw(grid) {
    this.view.replaceChildren();
    const zs = grid.z_labels.length ? grid.z_labels : [""];
    const cells = new Map();
    zs.forEach((zLabel, iz) => {
      const table = document.createElement("table");
      table.className = "xyz";
      if (zLabel) table.createCaption().textContent = zLabel;
      const head = table.createTHead().insertRow();
      head.append(document.createElement("td"));
      for (const x of grid.x_labels) {
        const th = document.createElement("th");
        th.scope = "col";
        th.textContent = x;
        head.append(th);
      }
      const body = table.createTBody();
      grid.y_labels.forEach((yLabel, iy) => {
        const tr = body.insertRow();
        const th = document.createElement("th");
        th.scope = "row";
        th.textContent = yLabel;
        tr.append(th);
        grid.x_labels.forEach((_, ix) => {
          const td = tr.insertCell();
          td.className = "pending";
          cells.set(`${ix},${iy},${iz}`, td);
        });
      });
      this.view.append(table);
    });
    for (const cell of grid.cells) {
      const td = cells.get(`${cell.x},${cell.y},${cell.z}`);
      const where = [grid.x_labels[cell.x], grid.y_labels[cell.y], zs[cell.z]].filter(Boolean).join(", ");
      this.tab.jobs.track({ id: cell.id }, (job) => {
        const img = document.createElement("img");
        img.src = `/sdapi/v2/jobs/${job.id}/images/0`;
        img.alt = `Grid cell ${where}`;
        img.title = (job.infotexts || [""])[0];
        td.className = "";
        td.replaceChildren(img);
      }, `Grid cell ${where || 1}`);
    }
  }
}
