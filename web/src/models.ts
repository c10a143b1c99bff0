// The model picker: the server's models (GET /admin/models) with their status; Activate
// switches (POST /admin/models/NAME/activate) and the status is polled until the model is
// available or failed.

import { getJson, sendJson } from "./api";
import { messageOf } from "./types";
import type { ModelStatus } from "./types";

const SETTLED = new Set<ModelStatus["status"]>(["available", "failed", "unloaded"]);

export class ModelPicker {
  private models: ModelStatus[] = [];
  private active: string | null = null;
  private timer: ReturnType<typeof setTimeout> | undefined;

  constructor(
    private readonly select: HTMLSelectElement,
    private readonly activateButton: HTMLButtonElement,
    private readonly statusLine: HTMLElement,
    private readonly onActiveChange: (name: string) => void,
  ) {
    select.addEventListener("change", () => this.showStatus());
    activateButton.addEventListener("click", () => void this.activate());
  }

  async refresh(): Promise<void> {
    try {
      this.models = await getJson<ModelStatus[]>("/admin/models");
    } catch (error) {
      this.statusLine.textContent = `Models unavailable: ${messageOf(error)}`;
      return;
    }
    const chosen = this.select.value;
    this.select.replaceChildren(
      ...this.models.map((model) => {
        const option = document.createElement("option");
        option.value = model.name;
        option.textContent = `${model.name} (${model.status})`;
        return option;
      }),
    );
    const active = this.models.find((m) => m.active);
    const keep = this.models.some((m) => m.name === chosen) ? chosen : active?.name;
    if (keep) this.select.value = keep;
    if (active && active.name !== this.active) {
      this.active = active.name;
      this.onActiveChange(active.name);
    }
    this.showStatus();
    this.schedule();
  }

  private showStatus(): void {
    const model = this.models.find((m) => m.name === this.select.value);
    if (!model) {
      this.statusLine.textContent = "";
      return;
    }
    let text = model.active
      ? `${model.name}: ${model.status}, answering`
      : `${model.name}: ${model.status}`;
    if (model.reason) text += ` (${model.reason})`;
    this.statusLine.textContent = text;
    this.statusLine.dataset.status = model.status;
    this.activateButton.disabled = model.active;
  }

  private schedule(): void {
    clearTimeout(this.timer);
    const busy = this.models.some((m) => !SETTLED.has(m.status));
    this.timer = setTimeout(() => void this.refresh(), busy ? 1000 : 15000);
  }

  private async activate(): Promise<void> {
    const name = this.select.value;
    if (!name) return;
    try {
      await sendJson("POST", `/admin/models/${encodeURIComponent(name)}/activate`);
    } catch (error) {
      this.statusLine.textContent = `Could not activate ${name}: ${messageOf(error)}`;
      return;
    }
    await this.refresh();
  }
}
