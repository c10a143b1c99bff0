// The page's calls to kiln: JSON requests, answers streamed as server-sent events over
// fetch (EventSource cannot POST), and the API key when the server asks for one.

const KEY_STORAGE = "kiln.apiKey";

export class ApiError extends Error {
  readonly status: number;

  constructor(status: number, message: string) {
    super(message);
    this.status = status;
  }
}

function headers(extra: Record<string, string> = {}): Record<string, string> {
  const result = { ...extra };
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function errorOf(response: Response): Promise<ApiError> {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = (await response.json()) as { error?: string | { message?: string } };
    const error = body.error;
    message = typeof error === "string" ? error : (error?.message ?? message);
  } catch {
    // not JSON: the status line says enough
  }
  return new ApiError(response.status, message);
}

interface SendOptions {
  method?: string;
  headers?: Record<string, string>;
  body?: string;
  signal?: AbortSignal;
}

/** fetch, asking for the API key (kept for the browser session) on a 401. */
async function send(path: string, options: SendOptions = {}, retried = false): Promise<Response> {
  const usedKey = sessionStorage.getItem(KEY_STORAGE);
  const response = await fetch(path, {
    ...options,
    headers: headers(options.headers),
    credentials: "same-origin",
  });
  if (response.status === 401 && !retried) {
    // Calls refused together ask once: those that come after the answer just use it.
    const current = sessionStorage.getItem(KEY_STORAGE);
    if (current && current !== usedKey) return send(path, options, true);
    const key = window.prompt("This kiln server needs its API key:");
    if (key) {
      sessionStorage.setItem(KEY_STORAGE, key.trim());
      return send(path, options, true);
    }
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

function jsonBody(body: unknown): Pick<SendOptions, "headers" | "body"> {
  return body === undefined
    ? {}
    : { headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
}

export async function getJson<T>(path: string): Promise<T> {
  return (await (await send(path)).json()) as T;
}

/** `method` `path` with `body` as JSON; resolves to the JSON answer (null for a 204). */
export async function sendJson<T = unknown>(
  method: string,
  path: string,
  body?: unknown,
): Promise<T> {
  const response = await send(path, { method, ...jsonBody(body) });
  return (response.status === 204 ? null : await response.json()) as T;
}

/** POST `body` to `path` and call `onEvent` with each server-sent event's JSON data.
 * Resolves when the stream ends; `signal` aborts it (the server then stops the answer). */
export async function streamEvents<T>(
  path: string,
  body: unknown,
  onEvent: (event: T) => void,
  signal?: AbortSignal,
): Promise<void> {
  const response = await send(path, { method: "POST", ...jsonBody(body), signal });
  if (!response.body) return;
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let boundary: number;
    while ((boundary = buffer.indexOf("\n\n")) !== -1) {
      const event = buffer.slice(0, boundary);
      buffer = buffer.slice(boundary + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) onEvent(JSON.parse(data) as T);
    }
  }
}

/** Fetch `path` and save what it answers as a file (named by its Content-Disposition).
 * NOTE: fetched rather than linked, so that the API key (a header) goes with it. */
export async function download(path: string, fallbackName: string): Promise<void> {
  const response = await send(path);
  const disposition = response.headers.get("Content-Disposition") ?? "";
  const name = /filename="([^"]+)"/.exec(disposition)?.[1] ?? fallbackName;
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}
