// mvjax speech page: streams raw 16-bit PCM from POST /v1/audio/speech and plays it with Web Audio
// as it arrives, then offers the whole clip in an <audio> element and as a download.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "mvjax.apiKey";
  const state = {
    bytesReceived: 0, samplesReceived: 0, chunksPlayed: 0, done: false, error: null,
    busy: false, audioContext: null, ttfa: null, serverTtfa: null, seed: null, sampleRate: 24000, auth: false,
    formats: ["wav"],
  };
  window.mvjaxState = state;

  let audioCtx = null;
  let controller = null;
  let lastUrl = null;

  function apiKey() { return localStorage.getItem(KEY_STORE) || ""; }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const key = apiKey();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  function setStatus(text) { $("status").textContent = text; }

  // The time to first audio: measured here (request sent -> first audio bytes) and the server's own
  // (X-Time-To-First-Audio: arrival -> first audio ready); hidden until a stream has audio.
  function showTtfa(seconds, serverSeconds) {
    $("ttfa").hidden = seconds == null;
    if (seconds == null) return;
    $("ttfa-value").textContent = seconds.toFixed(2) + " s" +
      (serverSeconds != null ? " (server " + serverSeconds.toFixed(2) + " s)" : "");
  }

  function showError(message) {
    state.error = message;
    const el = $("error");
    el.textContent = message;
    el.hidden = !message;
  }

  // The message from the server's JSON error body ({"error": {"message": ...}}), or a fallback.
  async function errorMessage(response) {
    let message = "HTTP " + response.status + " " + (response.statusText || "");
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) {
        message = body.error.message;
      } else if (body && body.detail) {
        message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      }
    } catch (e) { /* not JSON: keep the status line */ }
    if (response.status === 401 && state.auth) $("auth").hidden = false;
    return message;
  }

  async function loadHealth() {
    try {
      const r = await fetch("/health");
      const h = await r.json();
      state.auth = !!h.auth;
      state.sampleRate = h.sample_rate || state.sampleRate;
      state.formats = h.formats && h.formats.length ? h.formats : ["wav"];
      $("server").textContent = (h.model || "model") + " \u00b7 " + state.sampleRate + " Hz \u00b7 " +
        (h.voices != null ? h.voices + " voice(s)" : "") + (h.status !== "ok" ? " \u00b7 " + h.status : "");
      $("auth").hidden = !state.auth;
      $("apikey").value = apiKey();
      const fmt = $("format");
      const keep = fmt.value;
      fmt.innerHTML = "";
      for (const f of state.formats) fmt.add(new Option(f, f));
      if (state.formats.includes(keep)) fmt.value = keep;
    } catch (e) {
      $("server").textContent = "server unreachable: " + e;
    }
  }

  async function loadVoices() {
    const sel = $("voice");
    const keep = sel.value;
    try {
      const r = await fetch("/v1/audio/voices", { headers: headers() });
      if (!r.ok) { showError(await errorMessage(r)); return; }
      const names = (await r.json()).voices || [];
      sel.innerHTML = "";
      for (const n of names) sel.add(new Option(n, n));
      if (names.includes(keep)) sel.value = keep;
      if (!names.length) sel.add(new Option("(no voices: add one below)", ""));
    } catch (e) {
      showError("could not load voices: " + e);
    }
  }

  function numberField(id) {
    const v = $(id).value.trim();
    return v === "" ? null : Number(v);
  }

  function request(format, stream, seed) {
    const body = {
      model: "tts-1", input: $("text").value, voice: $("voice").value,
      response_format: format, stream: stream,
    };
    const s = seed != null ? seed : numberField("seed");
    if (s != null) body.seed = Math.trunc(s);
    for (const [id, key] of [["temperature", "temperature"], ["top_p", "top_p"], ["guidance", "guidance_scale"]]) {
      const v = numberField(id);
      if (v != null && !Number.isNaN(v)) body[key] = v;
    }
    if ($("decoder").value) body.decoder = $("decoder").value;
    return body;
  }

  // A WAV file (16-bit mono) around little-endian int16 PCM bytes.
  function wavBlob(pcmParts, byteLength, rate) {
    const header = new DataView(new ArrayBuffer(44));
    const text = (off, s) => { for (let i = 0; i < s.length; i++) header.setUint8(off + i, s.charCodeAt(i)); };
    text(0, "RIFF"); header.setUint32(4, 36 + byteLength, true); text(8, "WAVE");
    text(12, "fmt "); header.setUint32(16, 16, true); header.setUint16(20, 1, true); header.setUint16(22, 1, true);
    header.setUint32(24, rate, true); header.setUint32(28, rate * 2, true);
    header.setUint16(32, 2, true); header.setUint16(34, 16, true);
    text(36, "data"); header.setUint32(40, byteLength, true);
    return new Blob([header.buffer].concat(pcmParts), { type: "audio/wav" });
  }

  function resetOutput() {
    const player = $("player");
    player.pause();
    player.removeAttribute("src");
    player.load();
    if (lastUrl) { URL.revokeObjectURL(lastUrl); lastUrl = null; }
    const link = $("download");
    link.hidden = true;
    link.removeAttribute("href");
    link.onclick = null;
  }

  async function speak() {
    if (state.busy) return;
    showError("");
    resetOutput();
    Object.assign(state, { bytesReceived: 0, samplesReceived: 0, chunksPlayed: 0, done: false, error: null,
                           ttfa: null, serverTtfa: null, seed: null, busy: true, audioContext: null });
    showTtfa(null);
    $("speak").disabled = true;
    $("stop").disabled = false;

    if (!audioCtx) audioCtx = new (window.AudioContext || window.webkitAudioContext)();
    const ctx = audioCtx;
    if (ctx.state === "suspended") { try { await ctx.resume(); } catch (e) { /* plays later */ } }

    controller = new AbortController();
    const started = performance.now();
    let playAt = 0;
    let rate = state.sampleRate;
    const parts = [];
    let carry = null; // an odd byte left from the previous read
    let firstAudio = null;
    setStatus("waiting for the first audio\u2026");
    try {
      const r = await fetch("/v1/audio/speech", {
        method: "POST", signal: controller.signal,
        headers: headers({ "Content-Type": "application/json" }),
        body: JSON.stringify(request("pcm", true, null)),
      });
      if (!r.ok) throw new Error(await errorMessage(r));
      rate = Number(r.headers.get("X-Sample-Rate")) || rate;
      state.seed = r.headers.get("X-Seed");
      const serverTtfa = r.headers.get("X-Time-To-First-Audio");
      state.serverTtfa = serverTtfa ? Number(serverTtfa) : null;
      const reader = r.body.getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        if (!value || !value.length) continue;
        state.bytesReceived += value.length;
        let bytes = value;
        if (carry !== null) {
          bytes = new Uint8Array(value.length + 1);
          bytes[0] = carry; bytes.set(value, 1);
          carry = null;
        }
        if (bytes.length % 2) { carry = bytes[bytes.length - 1]; bytes = bytes.subarray(0, bytes.length - 1); }
        if (!bytes.length) continue;
        const copy = bytes.slice(); // own, aligned buffer
        parts.push(copy);
        const pcm = new Int16Array(copy.buffer, 0, copy.length / 2);
        state.samplesReceived += pcm.length;
        const buf = ctx.createBuffer(1, pcm.length, rate);
        const ch = buf.getChannelData(0);
        for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
        const src = ctx.createBufferSource();
        src.buffer = buf;
        src.connect(ctx.destination);
        playAt = Math.max(playAt, ctx.currentTime + 0.05);
        src.start(playAt);
        playAt += buf.duration;
        state.chunksPlayed += 1;
        state.audioContext = ctx.state;
        if (firstAudio === null) {
          firstAudio = (performance.now() - started) / 1000;
          state.ttfa = firstAudio;
          showTtfa(firstAudio, state.serverTtfa);
        }
        setStatus("playing \u00b7 first audio after " + firstAudio.toFixed(2) + " s" +
                  (serverTtfa ? " (server " + Number(serverTtfa).toFixed(2) + " s)" : "") +
                  " \u00b7 " + (state.samplesReceived / rate).toFixed(1) + " s received");
      }
      const bytes = state.samplesReceived * 2;
      if (!bytes) throw new Error("the server sent no audio");
      const blob = wavBlob(parts, bytes, rate);
      lastUrl = URL.createObjectURL(blob);
      $("player").src = lastUrl;
      offerDownload();
      setStatus("done \u00b7 " + (state.samplesReceived / rate).toFixed(2) + " s of audio \u00b7 first audio after " +
                firstAudio.toFixed(2) + " s \u00b7 total " + ((performance.now() - started) / 1000).toFixed(2) +
                " s \u00b7 seed " + state.seed);
    } catch (e) {
      if (e.name === "AbortError") {
        setStatus("stopped");
      } else {
        showError(e.message || String(e));
        setStatus("");
      }
    } finally {
      state.busy = false;
      state.done = true;
      controller = null;
      $("speak").disabled = false;
      $("stop").disabled = true;
    }
  }

  // Download: the streamed clip as WAV, or for another format the same request again (same seed).
  function offerDownload() {
    const link = $("download");
    const fmt = $("format").value || "wav";
    link.hidden = false;
    link.download = "speech." + fmt;
    link.textContent = "Download (" + fmt + ")";
    if (fmt === "wav") {
      link.href = lastUrl;
      return;
    }
    const body = request(fmt, false, state.seed != null ? Number(state.seed) : null);
    link.href = "#";
    link.onclick = async (ev) => {
      if (link.dataset.ready) return; // the blob URL is set: let the browser download it
      ev.preventDefault();
      link.textContent = "preparing " + fmt + "\u2026";
      try {
        const r = await fetch("/v1/audio/speech", {
          method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body),
        });
        if (!r.ok) throw new Error(await errorMessage(r));
        link.href = URL.createObjectURL(await r.blob());
        link.dataset.ready = "1";
        link.textContent = "Download (" + fmt + ")";
        link.click();
      } catch (e) {
        showError(e.message || String(e));
        link.textContent = "Download (" + fmt + ")";
      }
    };
    delete link.dataset.ready;
  }

  async function upload(ev) {
    ev.preventDefault();
    const name = $("vname").value.trim();
    const file = $("vfile").files[0];
    if (!name || !file) { $("vstatus").textContent = "a name and a recording are needed"; return; }
    const form = new FormData();
    form.append("name", name);
    form.append("file", file, file.name);
    $("vsubmit").disabled = true;
    $("vstatus").textContent = "uploading\u2026";
    try {
      const r = await fetch("/v1/voices", { method: "POST", headers: headers(), body: form });
      if (!r.ok) throw new Error(await errorMessage(r));
      const v = await r.json();
      $("vstatus").textContent = "added voice " + v.name;
      await loadVoices();
      $("voice").value = v.name;
    } catch (e) {
      $("vstatus").textContent = "upload failed: " + (e.message || e);
    } finally {
      $("vsubmit").disabled = false;
    }
  }

  $("speak").addEventListener("click", speak);
  $("stop").addEventListener("click", () => {
    if (controller) controller.abort();
    if (audioCtx) { audioCtx.close(); audioCtx = null; } // drops what was scheduled
  });
  $("refresh").addEventListener("click", loadVoices);
  $("upload").addEventListener("submit", upload);
  $("savekey").addEventListener("click", () => {
    localStorage.setItem(KEY_STORE, $("apikey").value.trim());
    showError("");
    loadVoices();
  });
  $("text").addEventListener("keydown", (ev) => { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) speak(); });

  loadHealth().then(loadVoices);
})();
