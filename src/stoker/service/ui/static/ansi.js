// Terminal output -> DOM text, for job logs. SGR colour and style sequences become classes
// (or, for 256-colour and RGB, a style property set through the CSSOM); every other escape
// sequence and control character is dropped. Text only ever enters the page as text nodes.

const SGR_CLASSES = ["black", "red", "green", "yellow", "blue", "magenta", "cyan", "white"];
const PALETTE = [
  "#000000", "#cd3131", "#0dbc79", "#e5e510", "#2472c8", "#bc3fbc", "#11a8cd", "#e5e5e5",
  "#666666", "#f14c4c", "#23d18b", "#f5f543", "#3b8eea", "#d670d6", "#29b8db", "#ffffff",
];

// One escape sequence or control character: CSI (ESC [ or 0x9b), OSC (ESC ]... BEL/ST),
// DCS/SOS/PM/APC strings (ESC P/X/^/_ ... ST), a two-character ESC sequence, or a lone
// C0/C1 control other than tab and newline (carriage returns are handled by the caller).
// eslint-disable-next-line no-control-regex
const ESCAPE = /(?:\x1b\[|\x9b)([0-?]*)[ -/]*([@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[PX^_][^\x1b]*\x1b\\|\x1b[ -/]*[0-OQ-WYZ\\`-~]|[\x00-\x08\x0b\x0c\x0e-\x1a\x1c-\x1f\x7f-\x9f]/g;
/** A sequence cut by a chunk boundary is held back at most this long. */
const MAX_PENDING = 256;

function xterm256(n) {
  if (n < 16) return PALETTE[n];
  if (n < 232) {
    const c = n - 16;
    const level = (v) => (v ? 55 + v * 40 : 0);
    return `rgb(${level(Math.floor(c / 36))}, ${level(Math.floor(c / 6) % 6)}, ${level(c % 6)})`;
  }
  const grey = 8 + (n - 232) * 10;
  return `rgb(${grey}, ${grey}, ${grey})`;
}

/** The graphic rendition of one stream: updated by SGR sequences, applied to spans. */
export class Style {
  constructor() {
    this.reset();
  }

  reset() {
    this.fg = null;
    this.bg = null;
    this.bold = this.dim = this.italic = this.underline = this.inverse = false;
  }

  get plain() {
    return !(this.fg || this.bg || this.bold || this.dim || this.italic || this.underline || this.inverse);
  }

  /** Apply the parameters of one SGR sequence ("1;31", "38;5;208", "" = reset). */
  apply(params) {
    const codes = params === "" ? [0] : params.split(/[;:]/).map((p) => (p === "" ? 0 : Number(p)));
    for (let i = 0; i < codes.length; i += 1) {
      const code = codes[i];
      if (code === 0) this.reset();
      else if (code === 1) this.bold = true;
      else if (code === 2) this.dim = true;
      else if (code === 3) this.italic = true;
      else if (code === 4) this.underline = true;
      else if (code === 7) this.inverse = true;
      else if (code === 22) this.bold = this.dim = false;
      else if (code === 23) this.italic = false;
      else if (code === 24) this.underline = false;
      else if (code === 27) this.inverse = false;
      else if (code >= 30 && code <= 37) this.fg = { cls: SGR_CLASSES[code - 30] };
      else if (code >= 90 && code <= 97) this.fg = { cls: `bright-${SGR_CLASSES[code - 90]}` };
      else if (code >= 40 && code <= 47) this.bg = { cls: SGR_CLASSES[code - 40] };
      else if (code >= 100 && code <= 107) this.bg = { cls: `bright-${SGR_CLASSES[code - 100]}` };
      else if (code === 39) this.fg = null;
      else if (code === 49) this.bg = null;
      else if (code === 38 || code === 48) {
        let colour = null;
        if (codes[i + 1] === 5 && i + 2 < codes.length) {
          const n = codes[i + 2];
          if (n >= 0 && n <= 255) colour = { css: xterm256(n) };
          i += 2;
        } else if (codes[i + 1] === 2 && i + 4 < codes.length) {
          const [r, g, b] = codes.slice(i + 2, i + 5).map((v) => Math.min(255, Math.max(0, v | 0)));
          colour = { css: `rgb(${r}, ${g}, ${b})` };
          i += 4;
        } else {
          i = codes.length; // malformed: ignore the rest of this sequence
        }
        if (code === 38) this.fg = colour;
        else this.bg = colour;
      }
    }
  }

  /** A span showing `text` in this style (a bare text node when plain). */
  render(text) {
    if (this.plain) return document.createTextNode(text);
    const span = document.createElement("span");
    span.textContent = text;
    const classes = [];
    let [fg, bg] = [this.fg, this.bg];
    if (this.inverse) [fg, bg] = [bg ?? { cls: "default-bg" }, fg ?? { cls: "default-fg" }];
    if (fg?.cls) classes.push(`fg-${fg.cls}`);
    if (bg?.cls) classes.push(`bg-${bg.cls}`);
    if (this.bold) classes.push("bold");
    if (this.dim) classes.push("dim");
    if (this.italic) classes.push("italic");
    if (this.underline) classes.push("underline");
    span.className = classes.join(" ");
    // CSSOM, not a style attribute: the page's CSP allows no inline styles, and none is needed.
    if (fg?.css) span.style.color = fg.css;
    if (bg?.css) span.style.backgroundColor = bg.css;
    return span;
  }
}

/**
 * Split one stream's text into [kind, value] pieces: ["text", s] and ["sgr", params].
 * Returns the pieces and what to hold back (an escape sequence cut at the end of `text`).
 */
export function tokenize(text) {
  const pieces = [];
  let last = 0;
  ESCAPE.lastIndex = 0;
  for (let match = ESCAPE.exec(text); match; match = ESCAPE.exec(text)) {
    if (match.index > last) pieces.push(["text", text.slice(last, match.index)]);
    if (match[2] === "m") pieces.push(["sgr", match[1]]);
    last = ESCAPE.lastIndex;
  }
  let rest = text.slice(last);
  let held = "";
  const esc = rest.lastIndexOf("\x1b");
  if (esc >= 0 && rest.length - esc <= MAX_PENDING) {
    // An unfinished sequence: keep it for the next chunk of the same stream.
    held = rest.slice(esc);
    rest = rest.slice(0, esc);
  }
  // A lone ESC that never finished (or a longer runaway sequence) is dropped.
  rest = rest.replaceAll("\x1b", "");
  if (rest) pieces.push(["text", rest]);
  return { pieces, held };
}
