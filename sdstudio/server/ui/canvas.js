// img2img's source image and inpainting mask: upload or drop an image, paint / erase the mask with a
// brush, invert or clear it, and extend the canvas for outpainting (the new border is masked).

const MASK_RGB = "255,255,255";

export class MaskCanvas {
  constructor(slot, onImage) {
    this.onImage = onImage; // called with (width, height) when the image changes size
    this.image = null; // a canvas holding the source pixels
    this.root = document.createElement("div");
    this.root.className = "mask-editor";
    this.root.innerHTML = `
      <div class="dropzone" data-role="drop">
        <label>Source image <input type="file" name="source" accept="image/*"></label>
        <p>or drop an image here</p>
      </div>
      <div class="stage" hidden>
        <canvas data-role="image" aria-label="Source image shown"></canvas>
        <canvas data-role="mask" aria-label="Mask: drag to paint"></canvas>
      </div>
      <div class="row tools" hidden>
        <label>Brush size <input type="range" name="brush" min="1" max="128" value="24"></label>
        <fieldset class="inline"><legend>Brush</legend>
          <label><input type="radio" name="brush-mode" value="paint" checked> Paint</label>
          <label><input type="radio" name="brush-mode" value="erase"> Erase</label>
        </fieldset>
        <button type="button" data-action="invert">Invert mask</button>
        <button type="button" data-action="clear">Clear mask</button>
        <button type="button" data-action="remove">Remove image</button>
      </div>
      <div class="row tools" hidden>
        <label>Extend by, pixels <input type="number" name="extend" min="8" max="1024" step="8" value="64"></label>
        <button type="button" data-side="left">Extend left</button>
        <button type="button" data-side="right">Extend right</button>
        <button type="button" data-side="up">Extend up</button>
        <button type="button" data-side="down">Extend down</button>
      </div>`;
    slot.append(this.root);
    this.stage = this.root.querySelector(".stage");
    this.imageCanvas = this.root.querySelector("[data-role=image]");
    this.maskCanvas = this.root.querySelector("[data-role=mask]");
    this.file = this.root.querySelector("input[type=file]");
    this.brush = this.root.querySelector("input[name=brush]");
    this.file.addEventListener("change", () => this.file.files[0] && this.loadBlob(this.file.files[0]));
    const drop = this.root.querySelector("[data-role=drop]");
    for (const target of [drop, this.stage]) {
      target.addEventListener("dragover", (e) => e.preventDefault());
      target.addEventListener("drop", (e) => {
        e.preventDefault();
        const f = e.dataTransfer.files[0];
        if (f) this.loadBlob(f);
      });
    }
    this.root.querySelector("[data-action=invert]").addEventListener("click", () => this.invert());
    this.root.querySelector("[data-action=clear]").addEventListener("click", () => this.clear());
    this.root.querySelector("[data-action=remove]").addEventListener("click", () => this.remove());
    for (const b of this.root.querySelectorAll("[data-side]")) b.addEventListener("click", () => this.extend(b.dataset.side));
    this.painting = false;
    this.maskCanvas.addEventListener("pointerdown", (e) => {
      this.painting = true;
      this.maskCanvas.setPointerCapture(e.pointerId);
      this.last = null;
      this.stroke(e);
    });
    this.maskCanvas.addEventListener("pointermove", (e) => this.painting && this.stroke(e));
    const stop = () => {
      this.painting = false;
      this.last = null;
    };
    this.maskCanvas.addEventListener("pointerup", stop);
    this.maskCanvas.addEventListener("pointercancel", stop);
  }

  get hasImage() {
    return this.image !== null;
  }

  async loadBlob(blob) {
    const bitmap = await createImageBitmap(blob);
    this.setImage(bitmap, bitmap.width, bitmap.height);
    bitmap.close();
  }

  async loadUrl(url) {
    const resp = await fetch(url);
    if (!resp.ok) throw new Error(`could not read the image (HTTP ${resp.status})`);
    await this.loadBlob(await resp.blob());
  }

  setImage(source, width, height) {
    const c = document.createElement("canvas");
    c.width = width;
    c.height = height;
    c.getContext("2d").drawImage(source, 0, 0);
    this.image = c;
    for (const canvas of [this.imageCanvas, this.maskCanvas]) {
      canvas.width = width;
      canvas.height = height;
    }
    this.imageCanvas.getContext("2d").drawImage(c, 0, 0);
    this.stage.hidden = false;
    for (const t of this.root.querySelectorAll(".tools")) t.hidden = false;
    this.onImage(width, height);
  }

  remove() {
    this.image = null;
    this.file.value = "";
    this.stage.hidden = true;
    for (const t of this.root.querySelectorAll(".tools")) t.hidden = true;
  }

  point(e) {
    const r = this.maskCanvas.getBoundingClientRect();
    return [((e.clientX - r.left) * this.maskCanvas.width) / r.width, ((e.clientY - r.top) * this.maskCanvas.height) / r.height];
  }

  stroke(e) {
    const ctx = this.maskCanvas.getContext("2d");
    const [x, y] = this.point(e);
    const r = this.maskCanvas.getBoundingClientRect();
    // the brush size is in screen pixels, as the user sees it
    const size = (Number(this.brush.value) * this.maskCanvas.width) / r.width;
    const erase = this.root.querySelector("input[name=brush-mode]:checked").value === "erase";
    ctx.globalCompositeOperation = erase ? "destination-out" : "source-over";
    ctx.strokeStyle = ctx.fillStyle = `rgb(${MASK_RGB})`;
    ctx.lineWidth = size;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    if (this.last) {
      ctx.moveTo(...this.last);
      ctx.lineTo(x, y);
      ctx.stroke();
    } else {
      ctx.arc(x, y, size / 2, 0, Math.PI * 2);
      ctx.fill();
    }
    this.last = [x, y];
  }

  clear() {
    this.maskCanvas.getContext("2d").clearRect(0, 0, this.maskCanvas.width, this.maskCanvas.height);
  }

  invert() {
    const ctx = this.maskCanvas.getContext("2d");
    const data = ctx.getImageData(0, 0, this.maskCanvas.width, this.maskCanvas.height);
    const px = data.data;
    for (let i = 0; i < px.length; i += 4) {
      px[i] = px[i + 1] = px[i + 2] = 255;
      px[i + 3] = 255 - px[i + 3];
    }
    ctx.putImageData(data, 0, 0);
  }

  hasMask() {
    const { width, height } = this.maskCanvas;
    if (!width || !height) return false;
    const px = this.maskCanvas.getContext("2d").getImageData(0, 0, width, height).data;
    for (let i = 3; i < px.length; i += 4) if (px[i] > 0) return true;
    return false;
  }

  // the outpainting border: the old image in place, its edge pixels stretched over the new part, the
  // new part masked (to be generated), the old mask kept
  extend(side) {
    if (!this.image) return;
    const by = Math.max(8, Math.round(Number(this.root.querySelector("input[name=extend]").value) / 8) * 8);
    const w = this.image.width, h = this.image.height;
    const [nw, nh] = side === "left" || side === "right" ? [w + by, h] : [w, h + by];
    const [ox, oy] = side === "left" ? [by, 0] : side === "up" ? [0, by] : [0, 0];
    const img = document.createElement("canvas");
    img.width = nw;
    img.height = nh;
    const ictx = img.getContext("2d");
    // stretch the edge row / column over the new border, then the image over it
    if (side === "left") ictx.drawImage(this.image, 0, 0, 1, h, 0, 0, by, h);
    if (side === "right") ictx.drawImage(this.image, w - 1, 0, 1, h, w, 0, by, h);
    if (side === "up") ictx.drawImage(this.image, 0, 0, w, 1, 0, 0, w, by);
    if (side === "down") ictx.drawImage(this.image, 0, h - 1, w, 1, 0, h, w, by);
    ictx.drawImage(this.image, ox, oy);
    const mask = document.createElement("canvas");
    mask.width = nw;
    mask.height = nh;
    const mctx = mask.getContext("2d");
    mctx.fillStyle = `rgb(${MASK_RGB})`;
    mctx.fillRect(0, 0, nw, nh);
    mctx.clearRect(ox, oy, w, h);
    mctx.drawImage(this.maskCanvas, ox, oy);
    this.setImage(img, nw, nh);
    this.maskCanvas.getContext("2d").drawImage(mask, 0, 0);
  }

  // base64 PNGs for the payload
  imageBase64() {
    return this.image.toDataURL("image/png").split(",", 2)[1];
  }

  maskBase64() {
    const c = document.createElement("canvas");
    c.width = this.maskCanvas.width;
    c.height = this.maskCanvas.height;
    const ctx = c.getContext("2d");
    ctx.fillStyle = "black";
    ctx.fillRect(0, 0, c.width, c.height);
    ctx.drawImage(this.maskCanvas, 0, 0);
    return c.toDataURL("image/png").split(",", 2)[1];
  }
}
