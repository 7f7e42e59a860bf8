// The synthetic phone app (qwen2vl.agent.phone): one page, screens picked by the URL's hash, state in
// window.appState for the task checkers (qwen2vl.agent.phone_tasks). Text from the user is shown with
// textContent only (never as HTML). Start options in the query string: ?on=wifi,bluetooth turns toggles on.
"use strict";

// qwen2vl/demo/common.py PALETTE (tests/test_agent_env.py checks that the two agree)
const PALETTE = {
  "red": [220, 40, 40], "orange": [245, 140, 30], "yellow": [240, 210, 40], "green": [40, 160, 60],
  "light green": [140, 220, 120], "blue": [40, 80, 220], "light blue": [120, 190, 240],
  "purple": [130, 60, 180], "pink": [240, 130, 180]};
const DARK_TEXT = new Set(["orange", "yellow", "light green", "light blue", "pink"]);
const APPS = [["Settings", "blue"], ["Contacts", "green"], ["Search", "orange"], ["Camera", "purple"],
              ["Music", "pink"], ["Clock", "red"]];
const TOGGLES = [["wifi", "Wi-Fi"], ["bluetooth", "Bluetooth"], ["airplane", "Airplane mode"], ["dark", "Dark mode"]];
const CONTACTS = ["Alice", "Bob", "Carol", "David", "Emma", "Frank"];
const CONTACT_COLOURS = ["light blue", "yellow", "light green", "pink", "orange", "purple"];

const appState = {screen: "home", wifi: false, bluetooth: false, airplane: false, dark: false,
                  contact: null, calls: [], searches: [], query: ""};
window.appState = appState;

const on = new URLSearchParams(location.search).get("on");
for (const name of (on ? on.split(",") : [])) {
  if (TOGGLES.some(([key]) => key === name)) appState[name] = true;
}

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function button(label, colour, onClick, cls) {
  const b = el("button", label, {type: "button", "data-label": label});
  if (cls) b.className = cls;
  const [r, g, bl] = PALETTE[colour];
  b.style.background = `rgb(${r}, ${g}, ${bl})`;
  b.style.color = DARK_TEXT.has(colour) ? "#202020" : "#ffffff";
  b.addEventListener("click", onClick);
  return b;
}

function go(hash) {  // a new history entry, drawn at once (no waiting for hashchange)
  history.pushState(null, "", "#" + hash);
  render();
}

function header(root, title) {
  const top = el("div", null, {class: "top"});
  top.append(button("Back", "light blue", () => history.back(), "back"), el("h1", title));
  root.append(top);
}

function home(root) {
  root.append(el("h1", "Home"));
  const grid = el("div", null, {class: "grid"});
  for (const [name, colour] of APPS) grid.append(button(name, colour, () => go(name.toLowerCase())));
  root.append(grid);
}

function settings(root) {
  header(root, "Settings");
  const list = el("div", null, {class: "list"});
  for (const [key, label] of TOGGLES) {
    const state = appState[key];
    list.append(button(`${label}: ${state ? "On" : "Off"}`, state ? "green" : "light blue", () => {
      appState[key] = !appState[key];
      render();
    }, "toggle"));
  }
  root.append(list);
}

function contacts(root) {
  header(root, "Contacts");
  const list = el("div", null, {class: "list"});
  CONTACTS.forEach((name, i) => list.append(button(name, CONTACT_COLOURS[i], () => go("contact/" + name))));
  root.append(list);
}

function contact(root, name) {
  if (!CONTACTS.includes(name)) return contacts(root);
  appState.contact = name;
  header(root, name);
  root.append(el("p", `Mobile 555-01${10 + CONTACTS.indexOf(name)}`));
  root.append(button("Call", "green", () => { appState.calls.push(name); go("call/" + name); }, "act"));
}

function call(root, name) {
  root.append(el("h1", `Calling ${name}`));
  root.append(button("End", "red", () => history.back(), "act"));
}

function search(root) {
  header(root, "Search");
  const form = el("form", null, {autocomplete: "off"});
  const input = el("input", null, {type: "text", placeholder: "Search", "aria-label": "Search box"});
  input.value = appState.query;
  input.addEventListener("input", () => { appState.query = input.value; });
  form.append(input, button("Search", "blue", () => form.requestSubmit()));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    appState.searches.push(input.value);
    go("results/" + encodeURIComponent(input.value));
  });
  root.append(form);
}

function results(root, query) {
  header(root, "Results");
  root.append(el("p", `Results for ${query}`));
  for (let i = 1; i <= 3; i++) root.append(el("p", `${query}: result ${i}`, {class: "result"}));
}

function empty(root, title) {
  header(root, title);
  root.append(el("p", `${title} has nothing to do here.`));
}

function render() {
  const hash = decodeURIComponent(location.hash.slice(1)) || "home";
  const [screen, ...rest] = hash.split("/");
  const arg = rest.join("/");
  const root = document.getElementById("screen");
  root.replaceChildren();
  appState.screen = screen;
  document.body.classList.toggle("dark", appState.dark);
  const screens = {home, settings, contacts, contact, call, search, results,
                   camera: (r) => empty(r, "Camera"), music: (r) => empty(r, "Music"), clock: (r) => empty(r, "Clock")};
  (screens[screen] || home)(root, arg);
  if (!screens[screen]) appState.screen = "home";
  window.scrollTo(0, 0);
}

window.addEventListener("popstate", render);
render();
document.body.dataset.ready = "true";
