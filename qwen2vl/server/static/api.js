// The page's client of this server: /webui/config.json, /v1/models and streamed /v1/chat/completions (SSE).

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function errorOf(resp) {
  let message = `HTTP ${resp.status}`;
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (e) { /* not JSON: the status says it */ }
  return new ApiError(resp.status, message);
}

export class Api {
  // key(): the API key to send, or "" for none.
  constructor(key) {
    this.key = key;
  }

  headers() {
    const h = { "Content-Type": "application/json" };
    const key = this.key();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  async config() {
    const resp = await fetch("webui/config.json");
    if (!resp.ok) throw await errorOf(resp);
    return resp.json();
  }

  async models() {
    const resp = await fetch("v1/models", { headers: this.headers() });
    if (!resp.ok) throw await errorOf(resp);
    return (await resp.json()).data;
  }

  // Yields the parsed chunks of a streamed chat completion; throws ApiError for an error answer or error event,
  // and the fetch's AbortError when signal aborts.
  async *chat(body, signal) {
    const resp = await fetch("v1/chat/completions", {
      method: "POST", headers: this.headers(), body: JSON.stringify(body), signal,
    });
    if (!resp.ok) throw await errorOf(resp);
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.search(/\r?\n\r?\n/)) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut).replace(/^\r?\n\r?\n/, "");
        const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(chunk.error.code || 500, chunk.error.message || "the stream failed");
        yield chunk;
      }
    }
  }
}
