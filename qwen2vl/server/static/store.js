// What the page keeps in the browser: conversations in IndexedDB (their pictures are data URLs, too big for
// localStorage), settings and the API key in localStorage. Without IndexedDB (a private window that refuses it)
// conversations live for the page's lifetime only.

const DB = "qwen2vl-chat", STORE = "conversations";
const SETTINGS = "qwen2vl.settings", KEY = "qwen2vl.apiKey";

function request(r) {
  return new Promise((resolve, reject) => {
    r.onsuccess = () => resolve(r.result);
    r.onerror = () => reject(r.error);
  });
}

export class Store {
  constructor() {
    this.db = null;
    this.memory = new Map();
  }

  async open() {
    try {
      const r = indexedDB.open(DB, 1);
      r.onupgradeneeded = () => r.result.createObjectStore(STORE, { keyPath: "id" });
      this.db = await request(r);
    } catch (e) {
      this.db = null;
    }
  }

  tx(mode) {
    return this.db.transaction(STORE, mode).objectStore(STORE);
  }

  // Every conversation, the most recent first.
  async list() {
    const all = this.db ? await request(this.tx("readonly").getAll()) : [...this.memory.values()];
    return all.sort((a, b) => b.updated - a.updated);
  }

  async save(conv) {
    conv.updated = Date.now();
    const copy = JSON.parse(JSON.stringify(conv));
    if (this.db) await request(this.tx("readwrite").put(copy));
    else this.memory.set(conv.id, copy);
  }

  async remove(id) {
    if (this.db) await request(this.tx("readwrite").delete(id));
    else this.memory.delete(id);
  }
}

export function loadSettings() {
  try {
    return JSON.parse(localStorage.getItem(SETTINGS) || "{}") || {};
  } catch (e) {
    return {};
  }
}

export function saveSettings(s) {
  localStorage.setItem(SETTINGS, JSON.stringify(s));
}

export function apiKey() {
  return localStorage.getItem(KEY) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY, key);
  else localStorage.removeItem(KEY);
}
