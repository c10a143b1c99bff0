// The settings dialog of a conversation: system prompt and generation parameters. Empty
// fields mean "the model's default", shown as placeholders (from GET /api/chat/defaults).

import { messageOf } from "./types";
import type { ConversationSummary, Settings } from "./types";

type SettingName = keyof Settings;

const NUMBER_FIELDS: Record<SettingName, (text: string) => number> = {
  temperature: parseFloat,
  top_p: parseFloat,
  top_k: (text) => parseInt(text, 10),
  max_new_tokens: (text) => parseInt(text, 10),
  repetition_penalty: parseFloat,
};

export interface SettingsChanges {
  system_prompt: string;
  settings: Settings;
}

export class SettingsDialog {
  private readonly error: HTMLElement;

  constructor(
    private readonly dialog: HTMLDialogElement,
    private readonly onSave: (changes: SettingsChanges) => Promise<void>,
  ) {
    this.error = dialog.querySelector<HTMLElement>("#settings-error")!;
    dialog.querySelector("#cancel-settings")!.addEventListener("click", () => dialog.close());
    dialog.querySelector("#save-settings")!.addEventListener("click", () => void this.save());
  }

  private field<T extends HTMLInputElement | HTMLTextAreaElement = HTMLInputElement>(
    name: string,
  ): T {
    return this.dialog.querySelector<T>(`[name="${name}"]`)!;
  }

  open(conversation: ConversationSummary | null, defaults: Settings | undefined): void {
    this.field<HTMLTextAreaElement>("system_prompt").value = conversation?.system_prompt ?? "";
    const settings = conversation?.settings ?? {};
    for (const name of Object.keys(NUMBER_FIELDS) as SettingName[]) {
      const input = this.field(name);
      input.value = String(settings[name] ?? "");
      input.placeholder = String(defaults?.[name] ?? "");
    }
    this.error.hidden = true;
    this.dialog.showModal();
  }

  async save(): Promise<void> {
    const settings: Settings = {};
    const fields = Object.entries(NUMBER_FIELDS) as [SettingName, (text: string) => number][];
    for (const [name, parse] of fields) {
      const text = this.field(name).value.trim();
      if (text === "") {
        settings[name] = null;
        continue;
      }
      const value = parse(text);
      if (!Number.isFinite(value)) {
        this.showError(`${name.replace(/_/g, " ")} must be a number`);
        return;
      }
      settings[name] = value;
    }
    try {
      await this.onSave({
        system_prompt: this.field<HTMLTextAreaElement>("system_prompt").value,
        settings,
      });
      this.dialog.close();
    } catch (error) {
      this.showError(messageOf(error));
    }
  }

  private showError(message: string): void {
    this.error.textContent = message;
    this.error.hidden = false;
  }
}
