// sdloom web UI: a thin page over the A1111 API this server speaks (/sdapi/v1/...) and the
// outputs history (/sdloom/v1/outputs). No build step: plain script, no dependencies.
"use strict";
const $ = (id) => document.getElementById(id);
const GEN_TABS = ["txt2img", "img2img", "inpaint"];
let mode = "txt2img";  // the generation tab the form is for
let tab = "txt2img";   // the tab shown
let results = [];      // [{src, infotext, seed}] of the last generation
let selected = 0;
let pngImage = null;   // {src, infotext, params} read on the PNG info tab
let history = {offset: 0, limit: 24, total: 0, items: [], selected: -1};
const images = {init: null, extras: null};  // data URLs of the chosen inputs

// ------------------------------------------------------------------ helpers
async function api(path, body, prefix = "/sdapi/v1/") {
  const init = body === undefined ? {} : {
    method: "POST", headers: {"content-type": "application/json"}, body: JSON.stringify(body)};
  const r = await fetch(prefix + path, init);
  const j = await r.json().catch(() => ({}));
  if (!r.ok) {
    const d = j.detail;
    throw new Error(typeof d === "string" ? d : d ? JSON.stringify(d) : r.status + " " + r.statusText);
  }
  return j;
}

function status(text, error = false, id = "status") {
  $(id).textContent = text;
  $(id).classList.toggle("error", error);
}

function blobToDataURL(blob) {
  return new Promise((resolve, reject) => {
    const rd = new FileReader();
    rd.onload = () => resolve(rd.result);
    rd.onerror = () => reject(rd.error);
    rd.readAsDataURL(blob);
  });
}

async function srcToDataURL(src) {
  return src.startsWith("data:") ? src : blobToDataURL(await (await fetch(src)).blob());
}

function fillSelect(sel, items, value) {
  sel.innerHTML = "";
  for (const [v, label] of items) sel.add(new Option(label, v, false, v === value));
}

function num(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const im = new Image();
    im.onload = () => resolve(im);
    im.onerror = () => reject(new Error("not a readable image"));
    im.src = src;
  });
}

// ------------------------------------------------------------------ lists from the server
async function loadLists() {
  const [samplers, schedulers, models, options] = await Promise.all([
    api("samplers"), api("schedulers"), api("sd-models"), api("options")]);
  fillSelect($("sampler_name"), samplers.map((s) => [s.name, s.name]), "DPM++ 2M");
  fillSelect($("scheduler"), schedulers.map((s) => [s.name, s.label]), "automatic");
  fillSelect($("model"), models.map((m) => [m.title, m.title]), options.sd_model_checkpoint);
  $("clip_skip").value = options.CLIP_stop_at_last_layers || 1;
  const [vaes, styles, latent, upscalers] = await Promise.all([
    api("sd-vae"), api("prompt-styles"), api("latent-upscale-modes"), api("upscalers")]);
  fillSelect($("sd_vae"), [["Automatic", "Automatic"], ["None", "None"],
    ...vaes.map((v) => [v.model_name, v.model_name])], options.sd_vae || "Automatic");
  fillSelect($("styles"), styles.map((s) => [s.name, s.name]));
  const ups = upscalers.filter((u) => u.name !== "None").map((u) => [u.name, u.name]);
  fillSelect($("hr_upscaler"), [...latent.map((m) => [m.name, m.name]), ...ups], "Latent");
  fillSelect($("upscaler_1"), [["None", "None"], ...ups], ups.length ? ups[0][0] : "None");
  fillSelect($("upscaler_2"), [["None", "None"], ...ups], "None");
  await loadNetworks();
}

async function loadNetworks() {
  const [loras, emb] = await Promise.all([api("loras"), api("embeddings")]);
  const chips = (el, names, text) => {
    el.innerHTML = "";
    if (!names.length) el.textContent = "(none)";
    for (const n of names) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = n;
      b.dataset.name = n;
      b.onclick = () => insertIntoPrompt(text(n));
      el.append(b);
    }
  };
  chips($("lora-list"), loras.map((l) => l.name), (n) => `<lora:${n}:1>`);
  chips($("embedding-list"), Object.keys(emb.loaded || {}), (n) => n);
}

function insertIntoPrompt(text) {
  // as A1111's extra networks: appended to the prompt, separated by a space
  const p = $("prompt");
  p.value = p.value.trim() ? p.value.replace(/\s+$/, "") + " " + text : text;
  p.focus();
}

// ------------------------------------------------------------------ the request
const AXES = ["Nothing", "Seed", "Steps", "CFG Scale", "Prompt S/R", "Sampler",
              "Var. seed", "Var. strength", "Hires steps"];

async function request() {
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    styles: [...$("styles").selectedOptions].map((o) => o.value),
    sampler_name: $("sampler_name").value, scheduler: $("scheduler").value,
    steps: num("steps"), cfg_scale: num("cfg_scale"), batch_size: num("batch_size"),
    n_iter: num("n_iter"), seed: num("seed") ?? -1, save_images: $("save_images").checked,
    override_settings: {sd_vae: $("sd_vae").value, CLIP_stop_at_last_layers: num("clip_skip") ?? 1},
  };
  if (num("width") !== null) body.width = num("width");
  if (num("height") !== null) body.height = num("height");
  if (mode === "txt2img") {
    if ($("enable_hr").checked) {
      Object.assign(body, {enable_hr: true, hr_scale: num("hr_scale"),
                           hr_upscaler: $("hr_upscaler").value,
                           hr_second_pass_steps: num("hr_second_pass_steps") ?? 0,
                           denoising_strength: num("hr_denoising")});
    }
  } else {
    if (!images.init) throw new Error("choose, drop or paste an image");
    body.init_images = [images.init];
    body.denoising_strength = num("denoising_strength");
    if (mode === "inpaint") {
      if (!mask.painted()) throw new Error("draw the mask on the image (white = repaint)");
      Object.assign(body, {
        mask: mask.toDataURL(), mask_blur: num("mask_blur") ?? 0,
        inpainting_fill: Number($("inpainting_fill").value),
        inpaint_full_res: $("inpaint_full_res").value === "true",
        inpaint_full_res_padding: num("inpaint_full_res_padding") ?? 0,
        inpainting_mask_invert: Number($("inpainting_mask_invert").value)});
    }
  }
  if ($("script").value === "x/y/z plot") {
    const axis = (k) => [$(`${k}_type`).value, $(`${k}_values`).value, []];
    // A1111's script_args by position (1.6-1.8 layout): ..., draw_legend, include_lone_images,
    // include_sub_grids, no_fixed_seeds, margin_size, csv_mode (values as text), raw_mode
    body.script_name = "x/y/z plot";
    body.script_args = [...axis("x"), ...axis("y"), ...axis("z"), $("draw_legend").checked,
      $("include_lone_images").checked, false, $("no_fixed_seeds").checked, 0, true, false];
  }
  return body;
}

// ------------------------------------------------------------------ generation
let polling = null;
let task = null;  // this page's job: progress, interrupt and skip name it, never another's
let busyTask = null;  // the job being polled; a poll answered after it ended is dropped
function setBusy(busy) {
  busyTask = busy ? task : null;
  $("generate").disabled = busy;
  $("skip").disabled = $("interrupt").disabled = !busy;
  $("progress").hidden = !busy;
  $("live").hidden = true;
  clearInterval(polling);
  if (busy) {
    $("progress").value = 0;
    polling = setInterval(async () => {
      try {
        const mine = task;
        const p = await api("progress?id_task=" + encodeURIComponent(mine));
        if (busyTask !== mine) return;
        $("progress").value = p.progress;
        const s = p.state;
        if (p.textinfo) {
          status(p.textinfo);  // e.g. "In queue: 2/3" while other users' jobs run
        } else if (s.job_count) {
          status(`batch ${s.job_no + 1}/${s.job_count}, step ${s.sampling_step}/${s.sampling_steps}` +
                 (p.eta_relative > 0 ? `, ~${p.eta_relative.toFixed(1)} s left` : ""));
        }
        if (p.current_image) {
          $("live").src = "data:image/png;base64," + p.current_image;
          $("live").hidden = false;
        }
      } catch (e) { /* the next poll will tell */ }
    }, 250);
  }
}

function show(i) {
  selected = i;
  document.querySelectorAll("#gallery img").forEach((im, k) => im.classList.toggle("selected", k === i));
  $("infotext").textContent = results[i] ? results[i].infotext : "";
}

async function generate() {
  let body;
  try {
    body = await request();
  } catch (e) {
    status(e.message, true);
    return;
  }
  task = `task(web-${Math.random().toString(36).slice(2, 12)})`;
  body.force_task_id = task;
  setBusy(true);
  status("starting…");
  const t0 = performance.now();
  try {
    const r = await api(mode === "inpaint" ? "img2img" : mode, body);
    const info = JSON.parse(r.info);
    results = r.images.map((b64, k) => ({
      src: "data:image/png;base64," + b64, infotext: info.infotexts[k], seed: info.all_seeds[k]}));
    const gallery = $("gallery");
    gallery.innerHTML = "";
    gallery.classList.toggle("many", results.length > 1);
    results.forEach((res, k) => {
      const a = document.createElement("a");
      a.href = res.src;
      a.download = `sdloom-${res.seed}.png`;
      const im = new Image();
      im.src = res.src;
      im.alt = `seed ${res.seed}`;
      im.onclick = (ev) => { ev.preventDefault(); show(k); };
      a.append(im);
      gallery.append(a);
    });
    show(0);
    const secs = ((performance.now() - t0) / 1000).toFixed(2);
    const partial = !body.script_name && results.length < body.batch_size * body.n_iter;
    status(results.length ? `${results.length} image(s) in ${secs} s` +
           (partial ? " (interrupted)" : "") : "interrupted: no images");
    history.offset = 0;  // the newest outputs are on the first page
  } catch (e) {
    status(e.message, true);
  } finally {
    setBusy(false);
  }
}

// ------------------------------------------------------------------ tabs
function setTab(t) {
  tab = t;
  if (GEN_TABS.includes(t)) mode = t;
  document.querySelectorAll(".tab").forEach((b) => b.classList.toggle("active", b.dataset.tab === t));
  const gen = GEN_TABS.includes(t);
  $("form").hidden = $("output").hidden = !gen;
  for (const id of ["extras", "pnginfo", "history"]) $(id).hidden = t !== id;
  $("init-row").hidden = mode === "txt2img";
  $("hires-row").hidden = mode !== "txt2img";
  $("brush-row").hidden = $("inpaint-row").hidden = $("mask-canvas").hidden = mode !== "inpaint";
  if (t === "history") loadHistory().catch((e) => status(e.message, true, "history-page"));
}

// ------------------------------------------------------------------ images in
async function setImage(target, url) {
  if (target === "init") {
    images.init = url;
    $("init-preview").src = url;
    const im = await loadImage(url);
    mask.reset(im.naturalWidth, im.naturalHeight);
  } else if (target === "extras") {
    images.extras = url;
    $("extras-preview").src = url;
  } else if (target === "png") {
    await readPngInfo(url);
  }
}

function targetOfTab() {
  return {img2img: "init", inpaint: "init", extras: "extras", pnginfo: "png"}[tab];
}

function wireDrops() {
  document.querySelectorAll(".drop").forEach((el) => {
    el.addEventListener("dragover", (e) => { e.preventDefault(); el.classList.add("over"); });
    el.addEventListener("dragleave", () => el.classList.remove("over"));
    el.addEventListener("drop", async (e) => {
      e.preventDefault();
      el.classList.remove("over");
      const f = [...e.dataTransfer.files].find((x) => x.type.startsWith("image/"));
      if (f) await setImage(el.dataset.target, await blobToDataURL(f));
    });
  });
  document.addEventListener("paste", async (e) => {
    const target = targetOfTab();
    const item = [...(e.clipboardData?.items || [])].find((i) => i.type.startsWith("image/"));
    if (!target || !item) return;  // text pastes go where they were typed
    e.preventDefault();
    await setImage(target, await blobToDataURL(item.getAsFile()));
  });
  const onFile = (input, target) => {
    input.onchange = async () => {
      const f = input.files[0];
      if (f) await setImage(target, await blobToDataURL(f));
    };
  };
  onFile($("init"), "init");
  onFile($("extras-file"), "extras");
  onFile($("png"), "png");
}

// ------------------------------------------------------------------ the inpaint mask
// drawn in the image's own pixels (white = repaint) on a canvas over the image
const mask = {
  canvas: null, ctx: null, drawing: false, last: null, any: false,
  init() {
    this.canvas = $("mask-canvas");
    this.ctx = this.canvas.getContext("2d");
    const c = this.canvas;
    c.addEventListener("pointerdown", (e) => {
      this.drawing = true;
      c.setPointerCapture(e.pointerId);
      this.last = this.at(e);
      this.stroke(this.last, this.last);
    });
    c.addEventListener("pointermove", (e) => {
      if (!this.drawing) return;
      const p = this.at(e);
      this.stroke(this.last, p);
      this.last = p;
    });
    const end = () => { this.drawing = false; };
    c.addEventListener("pointerup", end);
    c.addEventListener("pointercancel", end);
  },
  reset(w, h) {
    this.canvas.width = w;
    this.canvas.height = h;
    this.any = false;
  },
  at(e) {
    const r = this.canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * this.canvas.width / r.width,
            (e.clientY - r.top) * this.canvas.height / r.height];
  },
  stroke(a, b) {
    const g = this.ctx;
    g.globalCompositeOperation = $("eraser").checked ? "destination-out" : "source-over";
    g.strokeStyle = "#fff";
    g.lineWidth = Number($("brush-size").value);
    g.lineCap = g.lineJoin = "round";
    g.beginPath();
    g.moveTo(a[0], a[1]);
    g.lineTo(b[0], b[1]);
    g.stroke();
    if (!$("eraser").checked) this.any = true;
  },
  clear() {
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.any = false;
  },
  painted() {
    if (!this.any || !this.canvas.width) return false;
    const d = this.ctx.getImageData(0, 0, this.canvas.width, this.canvas.height).data;
    for (let i = 3; i < d.length; i += 4) if (d[i]) return true;
    return false;
  },
  toDataURL() {  // white strokes on black, opaque: A1111 reads the mask's luminance
    const out = document.createElement("canvas");
    out.width = this.canvas.width;
    out.height = this.canvas.height;
    const g = out.getContext("2d");
    g.fillStyle = "#000";
    g.fillRect(0, 0, out.width, out.height);
    g.drawImage(this.canvas, 0, 0);
    return out.toDataURL("image/png");
  },
};

// ------------------------------------------------------------------ send-to
async function paramsOf(src) {
  const r = await api("png-info", {image: await srcToDataURL(src)});
  return r.info ? r.parameters : {};
}

function fillFields(p) {
  if (p.Prompt !== undefined) $("prompt").value = p.Prompt;
  $("negative_prompt").value = p["Negative prompt"] || "";
  const direct = {Steps: "steps", "CFG scale": "cfg_scale", Seed: "seed", Sampler: "sampler_name",
                  "Clip skip": "clip_skip", "Hires steps": "hr_second_pass_steps",
                  "Hires upscale": "hr_scale", "Mask blur": "mask_blur"};
  for (const [k, id] of Object.entries(direct)) if (p[k] !== undefined) $(id).value = p[k];
  if (p["Schedule type"]) {
    const opt = [...$("scheduler").options].find((o) => o.text === p["Schedule type"]);
    if (opt) $("scheduler").value = opt.value;
  }
  if (p.Size) [$("width").value, $("height").value] = p.Size.split("x");
  if (p["Hires upscaler"]) $("hr_upscaler").value = p["Hires upscaler"];
  $("enable_hr").checked = p["Hires upscale"] !== undefined || p["Hires resize"] !== undefined;
  if (p["Denoising strength"] !== undefined) {
    $(p["Hires upscale"] !== undefined ? "hr_denoising" : "denoising_strength").value = p["Denoising strength"];
  }
}

// to: txt2img | img2img | inpaint | extras; image: {src, params?}
async function sendTo(to, image) {
  if (!image) return;
  if (to === "extras") {
    await setImage("extras", await srcToDataURL(image.src));
  } else {
    fillFields(image.params || await paramsOf(image.src));
    if (to !== "txt2img") await setImage("init", await srcToDataURL(image.src));
  }
  setTab(to);
}

function sendSource(from) {
  if (from === "gallery") return results[selected];
  if (from === "png") return pngImage;
  return history.items[history.selected] ? {src: history.items[history.selected].url} : null;
}

// ------------------------------------------------------------------ PNG info
async function readPngInfo(url) {
  $("png-preview").src = url;
  try {
    const r = await api("png-info", {image: url});
    pngImage = {src: url, params: r.info ? r.parameters : {}};
    $("png-text").textContent = r.info || "(no generation parameters in this image)";
    $("png-send").disabled = !r.info;
  } catch (e) { $("png-text").textContent = e.message; }
}

// ------------------------------------------------------------------ extras
async function runExtras() {
  if (!images.extras) return status("choose, drop or paste an image", true, "extras-status");
  const body = {
    image: images.extras, resize_mode: Number($("extras_resize_mode").value),
    upscaling_resize: num("upscaling_resize"), upscaling_resize_w: num("upscaling_resize_w"),
    upscaling_resize_h: num("upscaling_resize_h"), upscaling_crop: $("upscaling_crop").checked,
    upscaler_1: $("upscaler_1").value, upscaler_2: $("upscaler_2").value,
    extras_upscaler_2_visibility: num("extras_upscaler_2_visibility") ?? 0};
  $("extras-run").disabled = true;
  status("upscaling…", false, "extras-status");
  try {
    const r = await api("extra-single-image", body);
    const im = $("extras-result");
    im.src = "data:image/png;base64," + r.image;
    im.hidden = false;
    await im.decode();
    $("extras-info").textContent = new DOMParser().parseFromString(r.html_info, "text/html").body.textContent;
    status(`${im.naturalWidth}x${im.naturalHeight}`, false, "extras-status");
  } catch (e) {
    status(e.message, true, "extras-status");
  } finally {
    $("extras-run").disabled = false;
  }
}

// ------------------------------------------------------------------ history
async function loadHistory() {
  const r = await api(`outputs?offset=${history.offset}&limit=${history.limit}`, undefined,
                      "/sdloom/v1/");
  Object.assign(history, {total: r.total, items: r.items, selected: -1});
  const grid = $("history-grid");
  grid.innerHTML = "";
  r.items.forEach((it, k) => {
    const fig = document.createElement("figure");
    const im = new Image();
    im.src = it.url;
    im.alt = it.name;
    im.loading = "lazy";
    im.onclick = () => {
      history.selected = k;
      grid.querySelectorAll("img").forEach((x, j) => x.classList.toggle("selected", j === k));
      $("history-info").textContent = it.infotext || "(no generation parameters)";
    };
    const cap = document.createElement("figcaption");
    cap.textContent = it.name;
    fig.append(im, cap);
    grid.append(fig);
  });
  $("history-info").textContent = "";
  const last = Math.min(r.offset + r.items.length, r.total);
  $("history-page").textContent = r.total ? `${r.offset + 1}–${last} of ${r.total}` : "no saved images";
  $("history-prev").disabled = r.offset === 0;
  $("history-next").disabled = last >= r.total;
}

// ------------------------------------------------------------------ wiring
function wire() {
  document.querySelectorAll(".tab").forEach((b) => b.onclick = () => setTab(b.dataset.tab));
  $("generate").onclick = generate;
  $("interrupt").onclick = () => api("interrupt?id_task=" + encodeURIComponent(task), {});
  $("skip").onclick = () => api("skip?id_task=" + encodeURIComponent(task), {});
  $("random-seed").onclick = () => { $("seed").value = -1; };
  $("reuse-seed").onclick = () => { if (results[selected]) $("seed").value = results[selected].seed; };
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("generate").disabled &&
        GEN_TABS.includes(tab)) generate();
  });
  $("model").onchange = async () => {
    const title = $("model").value;
    status(`loading ${title}…`);
    $("generate").disabled = true;
    try {
      await api("options", {sd_model_checkpoint: title});
      await loadLists();
      status(`model: ${title}`);
    } catch (e) { status(e.message, true); }
    $("generate").disabled = false;
  };
  $("networks-refresh").onclick = async () => {
    await Promise.all([api("refresh-loras", {}), api("refresh-embeddings", {})]);
    await loadNetworks();
  };
  $("mask-clear").onclick = () => mask.clear();
  $("script").onchange = () => { $("xyz-row").hidden = $("script").value !== "x/y/z plot"; };
  document.querySelectorAll(".axis-type").forEach((sel, k) =>
    fillSelect(sel, AXES.map((a) => [a, a]), k === 0 ? "Seed" : "Nothing"));
  document.querySelectorAll(".sendto").forEach((box) => {
    box.querySelectorAll("button").forEach((b) => {
      b.onclick = () => sendTo(b.dataset.to, sendSource(box.dataset.from))
        .catch((e) => status(e.message, true));
    });
  });
  $("extras-run").onclick = runExtras;
  $("history-prev").onclick = () => {
    history.offset = Math.max(0, history.offset - history.limit);
    loadHistory();
  };
  $("history-next").onclick = () => { history.offset += history.limit; loadHistory(); };
  $("history-refresh").onclick = () => loadHistory();
  wireDrops();
  mask.init();
}

wire();
setTab("txt2img");
loadLists().catch((e) => status("cannot reach the API: " + e.message, true));
