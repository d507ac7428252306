// A job's live log: server-sent events from GET /v1/jobs/{id}/logs?follow=1, rendered as
// text with ANSI colours. The page stays responsive whatever the job prints: chunks are
// rendered a bounded amount per animation frame, a line shows at most MAX_LINE_CHARS
// characters, and the view keeps the last MAX_LINES lines (the rest is counted, not shown).

import { h } from "./dom.js";
import { Style, tokenize } from "./ansi.js";

export const MAX_LINES = 5000;
export const MAX_LINE_CHARS = 10000;
/** Characters of output rendered per animation frame before yielding to the browser. */
const FRAME_BUDGET = 1 << 20;
const RECONNECT_MS = 3000;

export class LogView {
  /**
   * @param {string} jobId
   * @param {{onEnd?: (end: object) => void, onStatus?: (text: string|null) => void}} hooks
   */
  constructor(jobId, { onEnd = () => {}, onStatus = () => {} } = {}) {
    this.jobId = jobId;
    this.onEnd = onEnd;
    this.onStatus = onStatus;
    this.lastSeq = 0;
    this.ended = false;
    this.closed = false;
    this.queue = [];
    this.scheduled = false;
    this.styles = {};
    this.decoders = {};
    this.held = {};
    this.pendingCR = {};
    this.lines = 0;
    this.hiddenLines = 0;
    this.received = 0;
    this.placeholder = h("p", { class: "muted log-empty" }, "No output yet.");
    this.hidden = h("p", { class: "muted log-hidden", hidden: true });
    this.output = h("div", {
      class: "log",
      role: "log",
      "aria-label": "Job output",
      tabindex: 0,
    });
    this.follow = h("input", { type: "checkbox", id: "log-follow", checked: true });
    this.follow.addEventListener("change", () => this.follow.checked && this.scrollToEnd());
    this.output.addEventListener("scroll", () => {
      const atEnd = this.output.scrollHeight - this.output.scrollTop - this.output.clientHeight < 24;
      if (!atEnd && this.follow.checked && !this.autoScrolling) this.follow.checked = false;
      this.autoScrolling = false;
    });
    this.element = h(
      "section",
      { class: "logs", "aria-labelledby": "logs-title" },
      h(
        "div",
        { class: "section-head" },
        h("h2", { id: "logs-title" }, "Output"),
        h("label", { class: "inline" }, this.follow, " Follow the end"),
      ),
      this.hidden,
      this.placeholder,
      this.output,
    );
    this.newLine();
  }

  /** Start following the stream (from the first chunk). */
  start() {
    if (this.closed || this.ended) return;
    const url = `/v1/jobs/${encodeURIComponent(this.jobId)}/logs?follow=1&after=${this.lastSeq}`;
    const source = new EventSource(url, { withCredentials: true });
    this.source = source;
    source.addEventListener("open", () => this.onStatus(null));
    source.addEventListener("log", (event) => {
      let chunk;
      try {
        chunk = JSON.parse(event.data);
      } catch {
        return;
      }
      if (typeof chunk.seq !== "number" || chunk.seq <= this.lastSeq) return;
      this.lastSeq = chunk.seq;
      this.push(chunk);
    });
    source.addEventListener("end", (event) => {
      this.ended = true;
      source.close();
      this.flushHeld();
      let end = null;
      try {
        end = JSON.parse(event.data);
      } catch {
        end = null;
      }
      this.schedule(() => {
        if (!this.received) this.placeholder.textContent = "No output.";
        this.onEnd(end);
      });
    });
    source.addEventListener("error", (event) => {
      if (event.data !== undefined) {
        // The service's own `error` event: it failed while streaming.
        let message = "the log stream failed";
        try {
          message = JSON.parse(event.data).error ?? message;
        } catch {
          /* keep the generic message */
        }
        this.onStatus(`Log stream: ${message}; reconnecting.`);
        return;
      }
      if (this.ended || this.closed) return;
      this.onStatus("The log stream was interrupted; reconnecting.");
      if (source.readyState === EventSource.CLOSED) {
        // The browser gave up (an error status): try again ourselves, after a pause.
        this.retry = setTimeout(() => this.start(), RECONNECT_MS);
      }
    });
  }

  /** Stop following (leaving the page). */
  close() {
    this.closed = true;
    clearTimeout(this.retry);
    this.source?.close();
  }

  push(chunk) {
    this.received += 1;
    this.queue.push([chunk.stream, this.decode(chunk)]);
    this.schedule();
  }

  decode(chunk) {
    if (chunk.encoding === "base64") {
      // Not UTF-8 on its own (invalid bytes, or a character cut at the chunk's edge): a
      // streaming decoder per stream joins cut characters and shows invalid bytes as U+FFFD.
      const binary = atob(chunk.data);
      const bytes = new Uint8Array(binary.length);
      for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
      this.decoders[chunk.stream] ??= new TextDecoder("utf-8");
      return this.decoders[chunk.stream].decode(bytes, { stream: true });
    }
    const decoder = this.decoders[chunk.stream];
    delete this.decoders[chunk.stream];
    return (decoder ? decoder.decode() : "") + String(chunk.data);
  }

  schedule(after) {
    if (after) this.queue.push(["call", after]);
    if (this.scheduled) return;
    this.scheduled = true;
    requestAnimationFrame(() => this.frame());
  }

  frame() {
    this.scheduled = false;
    let budget = FRAME_BUDGET;
    while (this.queue.length && budget > 0) {
      const [stream, text] = this.queue.shift();
      if (stream === "call") {
        text();
        continue;
      }
      if (text.length > budget) {
        // Render what fits now; the rest waits for the next frame.
        this.queue.unshift([stream, text.slice(budget)]);
        this.write(stream, text.slice(0, budget));
        budget = 0;
      } else {
        this.write(stream, text);
        budget -= text.length;
      }
    }
    this.showDropped();
    if (this.received) this.placeholder.hidden = true;
    if (this.follow.checked) this.scrollToEnd();
    if (this.queue.length) this.schedule();
  }

  scrollToEnd() {
    this.autoScrolling = true;
    this.output.scrollTop = this.output.scrollHeight;
  }

  /** One stream's text: split into lines; each line's text into styled pieces. */
  write(stream, text) {
    let data = (this.held[stream] ?? "") + text;
    this.held[stream] = "";
    if (this.pendingCR[stream]) {
      this.pendingCR[stream] = false;
      if (!data.startsWith("\n")) this.carriageReturn();
    }
    let start = 0;
    for (;;) {
      const nl = data.indexOf("\n", start);
      const last = nl < 0;
      let segment = data.slice(start, last ? data.length : nl);
      if (segment.endsWith("\r")) {
        segment = segment.slice(0, -1);
        // "\r\n" is a plain newline; a "\r" at the chunk's end decides with the next chunk.
        if (last) this.pendingCR[stream] = true;
      }
      this.segment(stream, segment, last);
      if (last) break;
      this.newLine();
      start = nl + 1;
    }
  }

  segment(stream, text, last) {
    if (this.lineChars >= MAX_LINE_CHARS) {
      this.lineDropped += text.length;
      return;
    }
    const parts = text.split("\r");
    parts.forEach((part, i) => {
      if (i > 0) this.carriageReturn();
      const { pieces, held } = tokenize(part);
      if (last && i === parts.length - 1) this.held[stream] = held;
      this.styles[stream] ??= new Style();
      for (const [kind, value] of pieces) {
        if (kind === "sgr") {
          this.styles[stream].apply(value);
          continue;
        }
        const room = MAX_LINE_CHARS - this.lineChars;
        const shown = value.length > room ? value.slice(0, room) : value;
        this.lineDropped += value.length - shown.length;
        if (!shown) continue;
        let node = this.styles[stream].render(shown);
        if (stream !== "stdout") {
          node = h("span", { class: `stream-${stream === "stderr" ? "stderr" : "system"}` }, node);
        }
        this.line.append(node);
        this.lineChars += shown.length;
      }
    });
  }

  flushHeld() {
    for (const stream of Object.keys(this.held)) this.held[stream] = "";
  }

  /** A carriage return without a newline: the line is drawn again (progress bars). */
  carriageReturn() {
    this.line.replaceChildren();
    this.lineChars = 0;
    this.lineDropped = 0;
    this.note = null;
  }

  newLine() {
    if (this.line) this.showDropped();
    this.line = h("div", { class: "line" });
    this.lineChars = 0;
    this.lineDropped = 0;
    this.note = null;
    this.output.append(this.line);
    this.lines += 1;
    if (this.lines > MAX_LINES) {
      this.output.firstElementChild?.remove();
      this.lines -= 1;
      this.hiddenLines += 1;
    }
  }

  showDropped() {
    if (this.lineDropped > 0) {
      this.note ??= h("span", { class: "truncated" });
      this.note.textContent = ` … ${this.lineDropped.toLocaleString("en")} more characters of this line not shown`;
      if (!this.note.isConnected) this.line.append(this.note);
    }
    if (this.hiddenLines) {
      this.hidden.hidden = false;
      this.hidden.textContent = `${this.hiddenLines.toLocaleString("en")} earlier lines are not shown here (stoker job logs ${this.jobId} prints the whole log).`;
    }
  }
}
