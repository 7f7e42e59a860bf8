// Files attached to a message: read as data URLs, checked against the server's limits (webui/config.json) before
// anything is sent, and shown as thumbnails with their size.

export function formatBytes(n) {
  if (n < 1024) return n + " B";
  if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KB";
  return (n / (1024 * 1024)).toFixed(1) + " MB";
}

// Bytes a file takes in a request body: base64 (4 characters per 3 bytes) plus its data URL header.
export function encodedSize(size, type) {
  return Math.ceil(size / 3) * 4 + type.length + 20;
}

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

function imageSize(url) {
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => resolve([img.naturalWidth, img.naturalHeight]);
    img.onerror = () => resolve(null);
    img.src = url;
  });
}

// A File -> an attachment {kind, name, type, size, url, width, height}; throws an Error whose message says why the
// server would refuse it. limits: webui/config.json's limits.
export async function readAttachment(file, limits) {
  const type = file.type || "";
  const kind = type.startsWith("image/") ? "image" : type.startsWith("video/") ? "video" : null;
  const name = file.name || (kind || "file");
  if (!kind) throw new Error(`"${name}" is not an image or a video (${type || "unknown type"})`);
  const max = limits.max_request_bytes;
  if (max && encodedSize(file.size, type) > max) {
    throw new Error(`"${name}" is ${formatBytes(file.size)}: too big for this server, which takes requests of ` +
      `at most ${formatBytes(max)} (about ${formatBytes(Math.floor(max * 3 / 4))} of files, as base64)`);
  }
  const url = await readDataUrl(file);
  const att = { kind, name, type, size: file.size, url, width: null, height: null };
  if (kind === "image") {
    const dims = await imageSize(url);
    if (!dims) throw new Error(`"${name}" is not an image this browser can read`);
    [att.width, att.height] = dims;
    const px = limits.max_image_pixels;
    if (px && att.width * att.height > px) {
      throw new Error(`"${name}" is ${att.width}×${att.height} pixels: over this server's limit of ` +
        `${px.toLocaleString("en")} pixels per image`);
    }
  }
  return att;
}

// Why a message with `pending` attachments, after a conversation with `history` ones, cannot be sent (or null).
export function checkRequest(history, pending, limits) {
  const all = history.concat(pending);
  const images = all.filter((a) => a.kind === "image").length;
  const videos = all.filter((a) => a.kind === "video").length;
  if (limits.max_images_per_request != null && images > limits.max_images_per_request) {
    return `this request would hold ${images} images; the server takes at most ` +
      `${limits.max_images_per_request} per request (the whole conversation counts): remove some or start a new chat`;
  }
  if (limits.max_videos_per_request != null && videos > limits.max_videos_per_request) {
    return `this request would hold ${videos} videos; the server takes at most ` +
      `${limits.max_videos_per_request} per request (the whole conversation counts): remove some or start a new chat`;
  }
  const bytes = all.reduce((n, a) => n + encodedSize(a.size, a.type), 0);
  if (limits.max_request_bytes && bytes > limits.max_request_bytes) {
    return `the files of this conversation make a request of about ${formatBytes(bytes)}, over the server's ` +
      `limit of ${formatBytes(limits.max_request_bytes)}: remove some or start a new chat`;
  }
  return null;
}

// A thumbnail of an attachment (with its name and size); onRemove: a remove button is added.
export function thumbnail(att, onRemove) {
  const fig = document.createElement("figure");
  fig.className = "thumb";
  const media = document.createElement(att.kind === "image" ? "img" : "video");
  media.src = att.url;
  if (att.kind === "image") media.alt = att.name;
  else { media.muted = true; media.preload = "metadata"; media.setAttribute("aria-label", att.name); }
  fig.append(media);
  const cap = document.createElement("figcaption");
  cap.textContent = `${att.name} · ${formatBytes(att.size)}`;
  cap.title = att.name;
  fig.append(cap);
  if (onRemove) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "remove";
    b.textContent = "×";
    b.setAttribute("aria-label", `Remove ${att.name}`);
    b.addEventListener("click", onRemove);
    fig.append(b);
  }
  return fig;
}
