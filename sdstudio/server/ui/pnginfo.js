// PNG info: drop any PNG (sdstudio's or AUTOMATIC1111's) to read its parameters and send them to a tab.

import { fileToBase64, notify, post } from "./api.js";

export class PngInfo {
  constructor(panel, app) {
    this.app = app;
    this.image = panel.querySelector("#pnginfo-image");
    this.text = panel.querySelector("#pnginfo-text");
    this.table = panel.querySelector("#pnginfo-table");
    this.toTxt = panel.querySelector("#pnginfo-to-txt2img");
    this.toImg = panel.querySelector("#pnginfo-to-img2img");
    const file = panel.querySelector("#pnginfo-file");
    file.addEventListener("change", () => file.files[0] && this.read(file.files[0]));
    const drop = panel.querySelector("#pnginfo-drop");
    drop.addEventListener("dragover", (e) => e.preventDefault());
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      if (e.dataTransfer.files[0]) this.read(e.dataTransfer.files[0]);
    });
    this.toTxt.addEventListener("click", () => this.app.restore("txt2img", this.payload, null));
    this.toImg.addEventListener("click", () => this.app.restore("img2img", this.payload, this.url));
  }

  async read(file) {
    notify("");
    let info;
    try {
      info = await post("/sdapi/v1/png-info", { image: await fileToBase64(file) });
    } catch (e) {
      notify(`PNG info: ${e.message}`);
      return;
    }
    if (this.url) URL.revokeObjectURL(this.url);
    this.url = URL.createObjectURL(file);
    this.image.src = this.url;
    this.image.hidden = false;
    this.text.textContent = info.info || "This image holds no generation parameters.";
    this.table.replaceChildren();
    for (const [k, v] of Object.entries(info.parameters || {})) {
      const row = this.table.insertRow();
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = k;
      row.append(th);
      row.insertCell().textContent = v;
    }
    this.payload = info.payload || {};
    this.toTxt.disabled = this.toImg.disabled = !info.info;
  }
}
