// sdloom web UI: a thin page over the A1111 API this server speaks (/sdapi/v1/...).
"use strict";
const $ = (id) => document.getElementById(id);
let mode = "txt2img";
let results = [];  // [{src, infotext, seed}]
let selected = 0;
let pngParams = null;

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: {"content-type": "application/json"}, body: JSON.stringify(body)};
  const r = await fetch("/sdapi/v1/" + path, init);
  const j = await r.json().catch(() => ({}));
  if (!r.ok) {
    const d = j.detail;
    throw new Error(typeof d === "string" ? d : d ? JSON.stringify(d) : r.status + " " + r.statusText);
  }
  return j;
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

function fileToDataURL(file) {
  return new Promise((resolve, reject) => {
    const rd = new FileReader();
    rd.onload = () => resolve(rd.result);
    rd.onerror = () => reject(rd.error);
    rd.readAsDataURL(file);
  });
}

function fillSelect(sel, items, value) {
  sel.innerHTML = "";
  for (const [v, label] of items) sel.add(new Option(label, v, false, v === value));
}

async function loadLists() {
  const [samplers, schedulers, models, options] = await Promise.all([
    api("samplers"), api("schedulers"), api("sd-models"), api("options")]);
  fillSelect($("sampler_name"), samplers.map((s) => [s.name, s.name]), "DPM++ 2M");
  fillSelect($("scheduler"), schedulers.map((s) => [s.name, s.label]), "automatic");
  fillSelect($("model"), models.map((m) => [m.title, m.title]), options.sd_model_checkpoint);
}

function num(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

async function request() {
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    sampler_name: $("sampler_name").value, scheduler: $("scheduler").value,
    steps: num("steps"), cfg_scale: num("cfg_scale"), batch_size: num("batch_size"),
    n_iter: num("n_iter"), seed: num("seed") ?? -1,
  };
  if (num("width") !== null) body.width = num("width");
  if (num("height") !== null) body.height = num("height");
  if (mode === "img2img") {
    const init = $("init").files[0];
    if (!init) throw new Error("choose an init image");
    body.init_images = [await fileToDataURL(init)];
    body.denoising_strength = num("denoising_strength");
    const mask = $("mask").files[0];
    if (mask) {
      body.mask = await fileToDataURL(mask);
      body.inpaint_full_res = false;
      body.inpainting_fill = 1;
    }
  } else if ($("enable_hr").checked) {
    Object.assign(body, {enable_hr: true, hr_scale: num("hr_scale"),
                         denoising_strength: num("hr_denoising")});
  }
  return body;
}

let polling = null;
let task = null;  // this page's job: progress, interrupt and skip name it, never another's
function setBusy(busy) {
  $("generate").disabled = busy;
  $("skip").disabled = $("interrupt").disabled = !busy;
  $("progress").hidden = !busy;
  $("live").hidden = true;
  clearInterval(polling);
  if (busy) {
    $("progress").value = 0;
    polling = setInterval(async () => {
      try {
        const p = await api("progress?id_task=" + encodeURIComponent(task));
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
    }, 400);
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
    const r = await api(mode, body);
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
    status(results.length ? `${results.length} image(s) in ${secs} s` : "interrupted: no images");
  } catch (e) {
    status(e.message, true);
  } finally {
    setBusy(false);
  }
}

function setMode(m) {
  mode = m === "pnginfo" ? mode : m;
  document.querySelectorAll(".tab").forEach((b) => b.classList.toggle("active", b.dataset.tab === m));
  const png = m === "pnginfo";
  $("pnginfo").hidden = !png;
  $("form").hidden = $("output").hidden = png;
  $("init-row").hidden = m !== "img2img";
  $("hires-row").hidden = m !== "txt2img";
}

const FIELDS = {Steps: "steps", "CFG scale": "cfg_scale", Seed: "seed", Sampler: "sampler_name"};
function sendToTxt2img() {
  const p = pngParams;
  if (!p) return;
  $("prompt").value = p.Prompt || "";
  $("negative_prompt").value = p["Negative prompt"] || "";
  for (const [k, id] of Object.entries(FIELDS)) if (p[k] !== undefined) $(id).value = p[k];
  if (p["Schedule type"]) {
    const opt = [...$("scheduler").options].find((o) => o.text === p["Schedule type"]);
    if (opt) $("scheduler").value = opt.value;
  }
  if (p.Size) [$("width").value, $("height").value] = p.Size.split("x");
  setMode("txt2img");
}

function wire() {
  document.querySelectorAll(".tab").forEach((b) => b.onclick = () => setMode(b.dataset.tab));
  $("generate").onclick = generate;
  $("interrupt").onclick = () => api("interrupt?id_task=" + encodeURIComponent(task), {});
  $("skip").onclick = () => api("skip?id_task=" + encodeURIComponent(task), {});
  $("random-seed").onclick = () => { $("seed").value = -1; };
  $("reuse-seed").onclick = () => { if (results[selected]) $("seed").value = results[selected].seed; };
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("generate").disabled && mode !== "pnginfo") generate();
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
  $("init").onchange = async () => {
    const f = $("init").files[0];
    $("init-preview").src = f ? await fileToDataURL(f) : "";
  };
  $("png").onchange = async () => {
    const f = $("png").files[0];
    if (!f) return;
    const url = await fileToDataURL(f);
    $("png-preview").src = url;
    try {
      const r = await api("png-info", {image: url});
      pngParams = r.info ? r.parameters : null;
      $("png-text").textContent = r.info || "(no generation parameters in this image)";
      $("png-send").disabled = !pngParams;
    } catch (e) { $("png-text").textContent = e.message; }
  };
  $("png-send").onclick = sendToTxt2img;
}

wire();
setMode("txt2img");
loadLists().catch((e) => status("cannot reach the API: " + e.message, true));
