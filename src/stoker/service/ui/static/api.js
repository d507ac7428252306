// The REST API, as the signed-in token sees it (the cookie carries the token). Every call
// has a deadline, and every failure shows in the banner instead of leaving the page stuck.

import { fill } from "./dom.js";

/** Seconds a request may take before the page says the service is slow. */
export const TIMEOUT_MS = 8000;
const CSRF_HEADER = document.getElementById("who")?.dataset.csrfHeader ?? "X-Stoker-CSRF";

/** The API answered with an error (`status`, and its one-line `error`). */
export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

const problems = new Map();

/** Show (or with `null`, clear) one kind of trouble in the page's banner. */
export function trouble(kind, message) {
  if (message) problems.set(kind, message);
  else problems.delete(kind);
  const banner = document.getElementById("banner");
  if (!banner) return;
  banner.hidden = problems.size === 0;
  fill(banner, ...[...problems.values()].map((text) => Object.assign(document.createElement("p"), { textContent: text })));
}

/** GET (or another method) `path`; JSON back. Throws ApiError, or Error when unreachable. */
export async function api(path, { method = "GET", timeout = TIMEOUT_MS } = {}) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeout);
  let response;
  try {
    response = await fetch(path, {
      method,
      signal: controller.signal,
      credentials: "same-origin",
      headers: method === "GET" ? {} : { [CSRF_HEADER]: "1" },
    });
  } catch (err) {
    const slow = controller.signal.aborted;
    const message = slow
      ? `The service did not answer within ${timeout / 1000} s; retrying.`
      : "The service is not reachable; retrying.";
    trouble("connection", message);
    throw new Error(message, { cause: err });
  } finally {
    clearTimeout(timer);
  }
  trouble("connection", null);
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (response.status === 401) {
    // Signed out, or the token was removed from the service's config.
    window.location.assign("/ui/login");
  }
  if (!response.ok) {
    const message = body && typeof body.error === "string" ? body.error : `HTTP ${response.status}`;
    if (response.status === 503 || response.status === 507) {
      trouble("service", `The service cannot serve this now: ${message}`);
    }
    throw new ApiError(response.status, message, body);
  }
  trouble("service", null);
  return body;
}

/** GET /health (no token): its report whether the host is ok (200) or not (503); null when
 * the service does not answer in time. */
export async function health(timeout = TIMEOUT_MS) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeout);
  try {
    const response = await fetch("/health", { signal: controller.signal, credentials: "same-origin" });
    return await response.json();
  } catch {
    return null;
  } finally {
    clearTimeout(timer);
  }
}

/** Like api(), but an endpoint this service does not have (404) gives `null`. */
export async function optional(path) {
  try {
    return await api(path);
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) return null;
    throw err;
  }
}
