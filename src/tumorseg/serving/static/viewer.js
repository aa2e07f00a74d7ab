// tumorseg viewer: uploads a case to POST /predict?format=viewer (or runs a demo case), then draws
// slices the server sends as base64 uint8 arrays (GET /cases/{id}/slice): no NIfTI decoding and no
// network access beyond this server. A 2-D image (summary.kind === "2d") is one slice with one
// region ("tumour") and a detection result instead of three planes, the label set's regions and volumes.
// A ground truth (POST /cases/{id}/ground-truth: NIfTI for 3-D, a mask image or Figshare .mat for 2-D)
// adds Dice (and for 2-D IoU) and its outline.
//
// A .zip of a DICOM study is imported by the server (series picked, co-registered to T1ce, brain
// extracted, 1 mm): the page shows the imported case like any 3-D case, the series it used, and offers
// the study's DICOM-SEG (GET /cases/{id}/dicom-seg, summary.dicom_seg_url) beside the segmentation.
//
// The 3-D regions come from the server: the model's label set (GET /health and every case summary,
// `model.label_set`) lists its train regions with their internal codes, caption and colour, and the
// page builds the region toggles, legend, overlay and volume table from it (WT/TC/ET for glioma,
// WT/TC/ET/RC for post-treatment glioma, WT/TC/CC/ET for paediatric tumours).
"use strict";

const PLANES = ["axial", "coronal", "sagittal"];
// The 2-D mask's one region; the 3-D regions are the label set's (setLabelSet).
const TUMOUR = { name: "tumour", colour: [255, 65, 54], has: (label) => label > 0 };
// The ground-truth control per kind of case: what it asks for and which files it accepts.
const REFERENCE_INPUT = {
  "3d": { label: "Ground-truth mask (same case, .nii.gz) for Dice per region", accept: ".nii,.gz" },
  "2d": {
    label: "Ground-truth mask (.png at the image's size, or the Figshare .mat) for Dice and IoU",
    accept: ".png,.mat,.jpg,.jpeg,.tif,.tiff,.bmp",
  },
};

const state = {
  caseId: null,
  summary: null,
  kind: "3d",
  cache: new Map(),
  drawing: 0,
  labelSet: null, // name of the label set the region controls were built for
  regions: [], // train regions in the network's order: { name, colour, has(label) }
  overlay: [], // the same regions innermost first (a voxel takes the first enabled one holding its label)
};

const planes = () => (state.kind === "2d" ? ["axial"] : PLANES);
const overlayRegions = () => (state.kind === "2d" ? [TUMOUR] : state.overlay);

const $ = (selector) => document.querySelector(selector);

function setStatus(text, kind = "info") {
  const status = $("#status");
  status.textContent = text;
  status.dataset.kind = kind;
}

const TOKEN_KEY = "tumorseg.token";

// fetch with the access token of this browser session (sessionStorage: gone when the tab closes);
// a 401 asks for the token once and retries.
async function api(url, options = {}) {
  for (let attempt = 0; ; attempt += 1) {
    const headers = new Headers(options.headers || {});
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.set("Authorization", `Bearer ${token}`);
    const response = await fetch(url, { ...options, headers });
    if (response.status !== 401 || attempt > 0) return response;
    const entered = window.prompt("This server needs an access token (from `tumorseg token create NAME`):");
    if (!entered) return response;
    sessionStorage.setItem(TOKEN_KEY, entered.trim());
  }
}

async function readJson(response) {
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    const message = body && body.error ? body.error : `HTTP ${response.status}`;
    throw new Error(message);
  }
  return body;
}

function decode(base64) {
  const raw = atob(base64);
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i += 1) out[i] = raw.charCodeAt(i);
  return out;
}

async function fetchSlice(plane, index) {
  const modality = $("#modality").value;
  const key = `${state.caseId}/${plane}/${index}/${modality}`;
  if (!state.cache.has(key)) {
    const url = `/cases/${encodeURIComponent(state.caseId)}/slice?plane=${plane}&index=${index}&modality=${modality}`;
    const body = await readJson(await api(url));
    state.cache.set(key, {
      width: body.width,
      height: body.height,
      pixelMm: body.pixel_mm,
      image: decode(body.image),
      labels: decode(body.labels),
      reference: body.reference ? decode(body.reference) : null,
    });
    if (state.cache.size > 300) state.cache.delete(state.cache.keys().next().value);
  }
  return state.cache.get(key);
}

// Build the region toggles and legend of a label set (label_set_info on the server); a no-op when
// they are already built for it, so a region switched off stays off from one case to the next.
function setLabelSet(labelSet) {
  if (!labelSet || labelSet.name === state.labelSet) return;
  state.labelSet = labelSet.name;
  state.regions = labelSet.regions.map((region) => {
    const codes = new Set(region.codes);
    return { name: region.name, colour: region.colour, has: (label) => codes.has(label) };
  });
  const byName = new Map(state.regions.map((region) => [region.name, region]));
  state.overlay = (labelSet.overlay_order || labelSet.regions.map((r) => r.name).reverse())
    .map((name) => byName.get(name))
    .filter(Boolean);
  const controls = $("#region-controls");
  controls.dataset.labelSet = labelSet.name;
  controls.replaceChildren(
    ...labelSet.regions.map((region) => {
      const label = document.createElement("label");
      label.className = "only-3d";
      const box = document.createElement("input");
      box.type = "checkbox";
      box.className = "region";
      box.value = region.name;
      box.checked = true;
      box.addEventListener("input", () => state.caseId && drawAll());
      const swatch = document.createElement("span");
      swatch.className = `swatch ${region.name.toLowerCase()}`;
      swatch.style.background = `rgb(${region.colour.join(", ")})`;
      label.append(box, " ", swatch, `${region.name} (${region.caption})`);
      return label;
    }),
  );
}

function enabledRegions() {
  return new Set([...document.querySelectorAll(".region")].filter((box) => box.checked).map((box) => box.value));
}

function overlayColour(label, enabled) {
  for (const region of overlayRegions()) {
    if (enabled.has(region.name) && region.has(label)) return region.colour;
  }
  return null;
}

function isEdge(mask, width, height, x, y) {
  const at = (xx, yy) => (xx < 0 || yy < 0 || xx >= width || yy >= height ? 0 : mask[yy * width + xx]);
  return at(x - 1, y) === 0 || at(x + 1, y) === 0 || at(x, y - 1) === 0 || at(x, y + 1) === 0;
}

async function drawPlane(plane) {
  const slider = document.querySelector(`.slice[data-plane="${plane}"]`);
  const index = Number(slider.value);
  slider.parentElement.querySelector("output").textContent = `${index + 1} / ${Number(slider.max) + 1}`;
  const slice = await fetchSlice(plane, index);
  const canvas = document.getElementById(`canvas-${plane}`);
  canvas.width = slice.width;
  canvas.height = slice.height;
  // true aspect ratio for anisotropic voxels
  canvas.style.aspectRatio = `${slice.width * slice.pixelMm[0]} / ${slice.height * slice.pixelMm[1]}`;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(slice.width, slice.height);
  const alpha = Number($("#opacity").value) / 100;
  const enabled = enabledRegions();
  const showReference = slice.reference && $("#show-reference").checked;
  let overlaid = 0;
  for (let i = 0; i < slice.image.length; i += 1) {
    const grey = slice.image[i];
    let rgb = [grey, grey, grey];
    const colour = overlayColour(slice.labels[i], enabled);
    if (colour) {
      rgb = rgb.map((value, c) => Math.round((1 - alpha) * value + alpha * colour[c]));
      overlaid += 1;
    }
    if (showReference && slice.reference[i] > 0) {
      const x = i % slice.width;
      const y = Math.floor(i / slice.width);
      if (isEdge(slice.reference, slice.width, slice.height, x, y)) rgb = [0, 200, 255];
    }
    pixels.data.set([rgb[0], rgb[1], rgb[2], 255], i * 4);
  }
  context.putImageData(pixels, 0, 0);
  canvas.dataset.overlayPixels = String(overlaid);
  return overlaid;
}

async function drawAll() {
  const ticket = (state.drawing += 1);
  const viewer = $("#viewer");
  viewer.dataset.state = "drawing";
  try {
    const counts = await Promise.all(planes().map(drawPlane));
    if (ticket === state.drawing) {
      viewer.dataset.overlayPixels = String(counts.reduce((a, b) => a + b, 0));
      viewer.dataset.state = "ready";
    }
  } catch (error) {
    setStatus(error.message, "error");
    viewer.dataset.state = "error";
  }
}

function percent(value) {
  return `${(100 * value).toFixed(1)} %`;
}

function showDetection(summary) {
  $("#detection-label").textContent = summary.label;
  $("#detection-probability").textContent = percent(summary.probability);
  const types = summary.type_probabilities || {};
  $("#detection-type").textContent = summary.tumour_type
    ? `${summary.tumour_type} (${percent(types[summary.tumour_type])})`
    : "-";
  const mm2 = summary.tumour_area_mm2 === null ? "" : `, ${summary.tumour_area_mm2.toFixed(1)} mm²`;
  $("#detection-area").textContent = `${summary.tumour_area_px} pixels${mm2}`;
  $("#detection-dice").textContent = summary.dice ? summary.dice.tumour.toFixed(3) : "-";
  $("#detection-iou").textContent = summary.iou ? summary.iou.tumour.toFixed(3) : "-";
  $("#reference-toggle").hidden = !summary.dice;
  const seconds = Object.values(summary.seconds || {}).reduce((a, b) => a + b, 0);
  $("#case-info").textContent =
    `${summary.case_id}: ${summary.shape.join(" x ")} pixels, ${summary.file_format}; ${seconds.toFixed(1)} s`;
}

function showSummary(summary) {
  if (summary.kind === "2d") {
    showDetection(summary);
    return;
  }
  const body = $("#volumes tbody");
  body.replaceChildren();
  const names = state.regions.length ? state.regions.map((r) => r.name) : Object.keys(summary.volumes_ml);
  for (const region of names) {
    const row = document.createElement("tr");
    row.dataset.region = region;
    const dice = summary.dice ? summary.dice[region] : null;
    const volume = summary.volumes_ml[region];
    for (const text of [
      region,
      volume === null || volume === undefined ? "-" : volume.toFixed(2),
      dice === null || dice === undefined ? "-" : dice.toFixed(3),
    ]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    body.append(row);
  }
  $("#reference-toggle").hidden = !summary.dice;
  const seconds = Object.values(summary.seconds || {}).reduce((a, b) => a + b, 0);
  // a DICOM study: the series it was imported from (T1ce first: the DICOM-SEG's reference)
  const series = summary.dicom
    ? ` From DICOM: ${["t1ce", "t1", "t2", "flair"]
        .filter((m) => summary.dicom.series[m])
        .map((m) => `${m.toUpperCase()} ${summary.dicom.series[m]}`)
        .join("; ")}.`
    : "";
  $("#case-info").textContent =
    `${summary.case_id}: ${summary.shape.join(" x ")} voxels, ${summary.spacing_mm.join(" x ")} mm, ` +
    `${summary.label_convention || summary.layout} labels; ${seconds.toFixed(1)} s.${series}`;
}

async function showCase(summary) {
  state.caseId = summary.result_id;
  state.summary = summary;
  state.kind = summary.kind === "2d" ? "2d" : "3d";
  if (state.kind === "3d") setLabelSet(summary.model && summary.model.label_set);
  state.cache.clear();
  $("#viewer").dataset.kind = state.kind;
  $("#axial-name").textContent = state.kind === "2d" ? "Image" : "Axial";
  for (const plane of planes()) {
    const slider = document.querySelector(`.slice[data-plane="${plane}"]`);
    slider.max = String(summary.slices[plane] - 1);
    slider.value = String(summary.focus[plane]);
  }
  $("#download").href = summary.segmentation_url;
  $("#download").setAttribute("download", summary.file_name);
  $("#download").textContent =
    state.kind === "2d"
      ? "Download tumour mask (.png)"
      : summary.dicom_seg_url
        ? `Download segmentation (.nii.gz, on the imported ${summary.spacing_mm[0]} mm grid shown here)`
        : "Download segmentation (.nii.gz)";
  $("#dicom-seg").hidden = !summary.dicom_seg_url;
  if (summary.dicom_seg_url) {
    $("#download-dicom-seg").href = summary.dicom_seg_url;
    $("#download-dicom-seg").setAttribute("download", summary.dicom_seg_file_name);
  }
  $("#reference-label").textContent = REFERENCE_INPUT[state.kind].label;
  $("#reference-file").accept = REFERENCE_INPUT[state.kind].accept;
  $("#reference-file").value = "";
  showSummary(summary);
  $("#viewer").hidden = false;
  await drawAll();
  const detected = state.kind === "2d" ? ` Tumour: ${summary.label}.` : "";
  const dicom = summary.dicom_seg_url ? " Imported from DICOM; its DICOM-SEG is ready to download." : "";
  setStatus(`Segmented ${summary.case_id}.${detected}${dicom}`);
}

async function run(label, request) {
  setStatus(`${label}: segmenting...`);
  for (const button of document.querySelectorAll("#inputs button")) button.disabled = true;
  try {
    const summary = await readJson(await request());
    await showCase(summary);
  } catch (error) {
    setStatus(error.message, "error");
  } finally {
    $("#upload-button").disabled = false;
    $("#demo-button").disabled = $("#demo-select").options.length === 0 || $("#demo-select").disabled;
  }
}

$("#upload-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const files = $("#files").files;
  if (!files.length) {
    setStatus("Choose the case's files first.", "error");
    return;
  }
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  // a zip may be a DICOM study, which the server imports first (registration, brain extraction)
  const zipped = files.length === 1 && files[0].name.toLowerCase().endsWith(".zip");
  const label = files.length === 1 ? files[0].name : `${files.length} files`;
  run(zipped ? `${label} (a DICOM study is imported first, which takes a minute or two)` : label, () =>
    api("/predict?format=viewer", { method: "POST", body: form }),
  );
});

$("#demo-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const caseId = $("#demo-select").value;
  run(caseId, () => api(`/demo/${encodeURIComponent(caseId)}?format=viewer`, { method: "POST" }));
});

$("#reference-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = $("#reference-file").files[0];
  if (!file || !state.caseId) return;
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const body = await readJson(
      await api(`/cases/${encodeURIComponent(state.caseId)}/ground-truth`, { method: "POST", body: form }),
    );
    Object.assign(state.summary, body); // dice (3-D per region, 2-D tumour), 2-D also iou and hd95_px
    state.cache.clear();
    showSummary(state.summary);
    await drawAll();
    const dice = state.kind === "2d" ? ` Dice ${body.dice.tumour.toFixed(3)}.` : "";
    setStatus(`Scored against the ground truth.${dice}`);
  } catch (error) {
    setStatus(error.message, "error");
  }
});

// The region toggles get theirs when they are built (setLabelSet).
for (const control of document.querySelectorAll(".region, #opacity, #show-reference")) {
  control.addEventListener("input", () => state.caseId && drawAll());
}
$("#modality").addEventListener("change", () => state.caseId && drawAll());
// A plain link cannot send the token: with one, a download goes through fetch and a blob URL.
for (const link of document.querySelectorAll("a.download")) {
  link.addEventListener("click", async (event) => {
    if (!sessionStorage.getItem(TOKEN_KEY)) return;
    event.preventDefault();
    try {
      const response = await api(link.href);
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const url = URL.createObjectURL(await response.blob());
      const save = document.createElement("a");
      save.href = url;
      save.download = link.getAttribute("download") || "segmentation";
      save.click();
      setTimeout(() => URL.revokeObjectURL(url), 1000);
    } catch (error) {
      setStatus(`Download failed: ${error.message}`, "error");
    }
  });
}
for (const slider of document.querySelectorAll(".slice")) {
  slider.addEventListener("input", () => state.caseId && drawPlane(slider.dataset.plane));
}

async function loadModel() {
  try {
    const health = await readJson(await api("/health"));
    const describe = (model) =>
      [model.name, model.version ? `version ${model.version}` : null, model.alias ? `@${model.alias}` : null]
        .filter(Boolean)
        .join(" ");
    const planar = health.model_2d && health.model_2d.available ? describe(health.model_2d) : "unavailable";
    const labelSet = health.model.label_set;
    setLabelSet(labelSet);
    const labels = labelSet ? ` (${labelSet.name}: ${labelSet.regions.map((r) => r.name).join(", ")})` : "";
    $("#model").textContent = `model: ${describe(health.model)}${labels}; 2-D model: ${planar}`;
  } catch (error) {
    $("#model").textContent = `model: unavailable (${error.message})`;
  }
}

// The demo list: 3-D cases and 2-D images (older servers send no cases_2d), once both are generated.
async function loadDemos(attempt = 0) {
  const select = $("#demo-select");
  try {
    const demo = await readJson(await api("/demo"));
    const ready = demo.ready && demo.ready_2d !== false;
    if (!ready && attempt < 60) {
      setTimeout(() => loadDemos(attempt + 1), 1000);
      return;
    }
    const groups = [
      ["3-D cases", demo.cases],
      ["2-D images", demo.cases_2d || []],
    ].filter(([, ids]) => ids.length);
    select.replaceChildren(
      ...groups.map(([label, ids]) => {
        const group = document.createElement("optgroup");
        group.label = label;
        group.append(...ids.map((caseId) => new Option(caseId, caseId)));
        return group;
      }),
    );
    const count = select.options.length;
    select.disabled = count === 0;
    $("#demo-button").disabled = count === 0;
    const failed = demo.error || demo.error_2d;
    if (!count) select.replaceChildren(new Option(failed ? "demo unavailable" : "no demo cases"));
  } catch (error) {
    select.replaceChildren(new Option("demo unavailable"));
  }
}

loadModel();
loadDemos();
