// livehead web client: microphone in, avatar video + audio out, on one RTCPeerConnection.
// Plain modern JS, no build step. Speaks only the wire protocol (server/PROTOCOL.md).
// URL parameters for automation: ?mode=presenter|viewer&room=NAME&token=T&autostart=1
'use strict';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const ICE_GATHER_TIMEOUT_MS = 5000;
const STATS_PERIOD_MS = 1000;

// Exposed for tests and the curious: connection state, the latest stats, errors.
window.livehead = { state: 'idle', stats: {}, server: {}, errors: [] };

let pc = null;
let channel = null;
let micStream = null;
let statsTimer = null;
let prevStats = null;

function setState(state, cls) {
  window.livehead.state = state;
  const el = $('state');
  el.textContent = state;
  el.className = 'state' + (cls ? ' ' + cls : '');
}

function say(text, isError) {
  const el = $('message');
  el.textContent = text || '';
  el.className = 'message' + (isError ? ' error' : '');
  if (isError) window.livehead.errors.push(text);
}

function authHeaders(extra) {
  const h = Object.assign({}, extra || {});
  const token = $('token').value.trim();
  if (token) h['Authorization'] = 'Bearer ' + token;
  return h;
}

async function errorText(resp) {
  try { return (await resp.json()).error || resp.statusText; } catch (e) { return resp.statusText; }
}

async function listMics() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.enumerateDevices) return;
  const sel = $('mic');
  const current = sel.value;
  const devices = await navigator.mediaDevices.enumerateDevices();
  sel.innerHTML = '<option value="">default</option>';
  devices.filter((d) => d.kind === 'audioinput' && d.deviceId && d.deviceId !== 'default')
    .forEach((d, i) => {
      const o = document.createElement('option');
      o.value = d.deviceId;
      o.textContent = d.label || `microphone ${i + 1}`;
      sel.appendChild(o);
    });
  sel.value = current;
}

// aiortc does not trickle ICE: the offer must carry every candidate.
function iceGatheringComplete(conn) {
  if (conn.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (conn.iceGatheringState === 'complete') {
        conn.removeEventListener('icegatheringstatechange', done);
        resolve();
      }
    };
    conn.addEventListener('icegatheringstatechange', done);
    setTimeout(resolve, ICE_GATHER_TIMEOUT_MS);
  });
}

async function start() {
  const mode = $('mode').value;
  const room = $('room').value.trim() || 'default';
  say('');
  setState('connecting');
  $('start').disabled = true;
  $('stop').disabled = false;
  try {
    pc = new RTCPeerConnection({ iceServers: [] });
    const remote = new MediaStream();
    $('video').srcObject = remote;
    pc.ontrack = (ev) => {
      remote.addTrack(ev.track);
      $('video').play().catch((e) => window.livehead.errors.push('play: ' + e));
    };
    pc.onconnectionstatechange = () => {
      const s = pc ? pc.connectionState : 'closed';
      if (s === 'connected') setState('live', 'live');
      else if (s === 'failed') { setState('failed', 'error'); say('connection failed', true); }
      else if (s === 'disconnected' || s === 'closed') setState(s);
    };
    if (mode === 'presenter') {
      const deviceId = $('mic').value;
      micStream = await navigator.mediaDevices.getUserMedia({
        audio: {
          deviceId: deviceId ? { exact: deviceId } : undefined,
          // The avatar plays our own voice back: cancel it so it does not loop into the mic.
          echoCancellation: true, noiseSuppression: true, autoGainControl: true,
        },
        video: false,
      });
      listMics().catch(() => {});
      pc.addTransceiver(micStream.getAudioTracks()[0], { direction: 'sendrecv', streams: [micStream] });
    } else {
      pc.addTransceiver('audio', { direction: 'recvonly' });
    }
    pc.addTransceiver('video', { direction: 'recvonly' });
    channel = pc.createDataChannel('control');
    channel.onmessage = onChannelMessage;
    channel.onopen = () => { $('controls').disabled = mode !== 'presenter'; };

    await pc.setLocalDescription(await pc.createOffer());
    await iceGatheringComplete(pc);
    const resp = await fetch('/offer', {
      method: 'POST',
      headers: authHeaders({ 'Content-Type': 'application/json' }),
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type, role: mode, room }),
    });
    if (!resp.ok) throw new Error(`server refused (${resp.status}): ${await errorText(resp)}`);
    await pc.setRemoteDescription(await resp.json());
    $('interrupt').disabled = mode !== 'presenter';
    prevStats = null;
    statsTimer = setInterval(() => pollStats().catch((e) => window.livehead.errors.push('stats: ' + e)),
      STATS_PERIOD_MS);
  } catch (e) {
    say(String(e.message || e), true);
    setState('error', 'error');
    stop(false);
  }
}

function stop(resetState = true) {
  clearInterval(statsTimer);
  statsTimer = null;
  if (channel) { try { channel.close(); } catch (e) { /* already closed */ } }
  if (pc) pc.close();
  if (micStream) micStream.getTracks().forEach((t) => t.stop());
  pc = channel = micStream = null;
  $('start').disabled = false;
  $('stop').disabled = true;
  $('interrupt').disabled = true;
  $('controls').disabled = true;
  if (resetState) setState('idle');
}

function onChannelMessage(ev) {
  let msg;
  try { msg = JSON.parse(ev.data); } catch (e) { return; }
  if (msg.type === 'stats') {
    window.livehead.server = msg;
  } else if (msg.type === 'interrupted') {
    say(`interrupted after ${(msg.played_ms / 1000).toFixed(2)} s of speech`);
  } else if (msg.type === 'error') {
    say(msg.message, true);
  }
}

function send(msg) {
  if (channel && channel.readyState === 'open') channel.send(JSON.stringify(msg));
}

// --- stats overlay ------------------------------------------------------------------------
// fps and drops from the video receiver; A/V offset estimated as the difference between the
// video and audio receive pipelines (jitter buffers + audio playout); latency as the server's
// own (input arrival -> frame sent, from the data channel) + half the RTT + the video jitter
// buffer. All from getStats(); the server sends audio and video of one pts together.
async function pollStats() {
  if (!pc) return;
  const report = await pc.getStats();
  let v = null, a = null, pair = null, playout = null;
  report.forEach((s) => {
    if (s.type === 'inbound-rtp' && s.kind === 'video') v = s;
    else if (s.type === 'inbound-rtp' && s.kind === 'audio') a = s;
    else if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') pair = s;
    else if (s.type === 'media-playout') playout = s;
  });
  const now = performance.now();
  const cur = { t: now, v, a, playout };
  const st = window.livehead.stats;
  if (v) {
    st.framesDecoded = v.framesDecoded || 0;
    st.framesDropped = v.framesDropped || 0;
    st.framesReceived = v.framesReceived || 0;
    st.width = v.frameWidth; st.height = v.frameHeight;
  }
  const ratio = (obj, prevObj, num, den) => {
    if (!obj || !prevObj) return null;
    const dn = (obj[num] || 0) - (prevObj[num] || 0);
    const dd = (obj[den] || 0) - (prevObj[den] || 0);
    return dd > 0 ? dn / dd : null;
  };
  if (prevStats) {
    const dt = (now - prevStats.t) / 1000;
    if (v && prevStats.v) st.fps = ((v.framesDecoded || 0) - (prevStats.v.framesDecoded || 0)) / dt;
    const videoJb = ratio(v, prevStats.v, 'jitterBufferDelay', 'jitterBufferEmittedCount');
    const videoDecode = ratio(v, prevStats.v, 'totalDecodeTime', 'framesDecoded');
    const audioJb = ratio(a, prevStats.a, 'jitterBufferDelay', 'jitterBufferEmittedCount');
    const audioPlayout = ratio(playout, prevStats.playout, 'totalPlayoutDelay', 'totalSamplesCount');
    if (videoJb != null && audioJb != null) {
      st.avOffsetMs = 1000 * ((videoJb + (videoDecode || 0)) - (audioJb + (audioPlayout || 0)));
    }
    const rtt = pair && pair.currentRoundTripTime != null ? pair.currentRoundTripTime : null;
    const server = window.livehead.server.latency_ms_p50;
    if (server != null && videoJb != null) {
      st.latencyMs = server + (rtt != null ? 500 * rtt : 0) + 1000 * (videoJb + (videoDecode || 0));
      st.latencyParts = { server, network: rtt != null ? 500 * rtt : null, receiver: 1000 * (videoJb + (videoDecode || 0)) };
    }
  }
  prevStats = cur;
  render(st);
}

function fmt(x, digits = 0, unit = '') { return x == null || Number.isNaN(x) ? '–' : x.toFixed(digits) + unit; }

function render(st) {
  $('o-fps').textContent = fmt(st.fps, 1);
  $('o-latency').textContent = fmt(st.latencyMs, 0, ' ms');
  $('o-av').textContent = st.avOffsetMs == null ? '–'
    : (st.avOffsetMs >= 0 ? 'video +' : 'video ') + st.avOffsetMs.toFixed(0) + ' ms';
  $('o-decoded').textContent = fmt(st.framesDecoded);
  $('o-dropped').textContent = fmt(st.framesDropped);
  const p = st.latencyParts;
  const s = window.livehead.server;
  $('o-detail').textContent = (p ? `server ${fmt(p.server)} + net ${fmt(p.network)} + rx ${fmt(p.receiver)} ms` : '')
    + (s.fps != null ? ` · server ${fmt(s.fps, 1)} fps, queue ${s.queue_frames}` : '');
}

// --- controls -----------------------------------------------------------------------------
let controlsPending = false;
function sendControls() {
  // Sliders fire many input events: coalesce to one message per animation frame.
  if (controlsPending) return;
  controlsPending = true;
  requestAnimationFrame(() => {
    controlsPending = false;
    send({
      type: 'controls',
      pose_deg: [+$('yaw').value, +$('pitch').value, +$('roll').value],
      location: +$('location').value,
      scale: +$('scale').value,
    });
  });
}

['yaw', 'pitch', 'roll', 'location', 'scale'].forEach((id) => {
  const input = $(id);
  input.addEventListener('input', () => {
    input.nextElementSibling.textContent = input.value;
    sendControls();
  });
});

$('reset-controls').addEventListener('click', () => {
  [['yaw', 0], ['pitch', 0], ['roll', 0], ['location', 0], ['scale', 1]].forEach(([id, v]) => {
    $(id).value = v;
    $(id).nextElementSibling.textContent = v;
  });
  send({ type: 'controls', pose_deg: null, location: null, scale: null });
});

$('interrupt').addEventListener('click', () => send({ type: 'interrupt' }));

// --- avatar upload ------------------------------------------------------------------------
$('upload').addEventListener('click', async () => {
  const file = $('avatar').files[0];
  if (!file) { say('choose an image first', true); return; }
  const room = $('room').value.trim() || 'default';
  const live = pc && pc.connectionState === 'connected' && $('mode').value === 'presenter';
  const url = '/avatar' + (live ? '?room=' + encodeURIComponent(room) : '');
  const resp = await fetch(url, {
    method: 'POST',
    headers: authHeaders({ 'Content-Type': file.type || 'application/octet-stream' }),
    body: file,
  });
  if (!resp.ok) { say(`upload refused (${resp.status}): ${await errorText(resp)}`, true); return; }
  const info = await resp.json();
  say(`avatar ${info.width}x${info.height} uploaded` + (info.room ? ` and applied to ${info.room}` : ''));
  window.livehead.avatar = info;
});

// --- wiring -------------------------------------------------------------------------------
$('start').addEventListener('click', start);
$('stop').addEventListener('click', () => stop());
$('mode').addEventListener('change', () => { $('mic').disabled = $('mode').value !== 'presenter'; });
window.addEventListener('beforeunload', () => stop());

for (const key of ['mode', 'room', 'token']) {
  if (params.has(key)) $(key).value = params.get(key);
}
listMics().catch(() => {});
if (params.get('autostart') === '1') start();
