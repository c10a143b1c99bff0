// The settings dialog of a conversation: system prompt and generation parameters. Empty
// fields mean "the model's default", shown as placeholders (from GET /api/chat/defaults).

const NUMBER_FIELDS = {
  temperature: parseFloat,
  top_p: parseFloat,
  top_k: (text) => parseInt(text, 10),
  max_new_tokens: (text) => parseInt(text, 10),
  repetition_penalty: parseFloat,
};

export class SettingsDialog {
  constructor(dialog, onSave) {
    this.dialog = dialog;
    this.onSave = onSave;
    this.error = dialog.querySelector("#settings-error");
    dialog.querySelector("#cancel-settings").addEventListener("click", () => dialog.close());
    dialog.querySelector("#save-settings").addEventListener("click", () => this.save());
  }

  field(name) {
    return this.dialog.querySelector(`[name="${name}"]`);
  }

  open(conversation, defaults) {
    this.field("system_prompt").value = conversation?.system_prompt ?? "";
    const settings = conversation?.settings ?? {};
    for (const name of Object.keys(NUMBER_FIELDS)) {
      const input = this.field(name);
      input.value = settings[name] ?? "";
      input.placeholder = defaults?.[name] ?? "";
    }
    this.error.hidden = true;
    this.dialog.showModal();
  }

  async save() {
    const settings = {};
    for (const [name, parse] of Object.entries(NUMBER_FIELDS)) {
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
      await this.onSave({ system_prompt: this.field("system_prompt").value, settings });
      this.dialog.close();
    } catch (error) {
      this.showError(error.message);
    }
  }

  showError(message) {
    this.error.textContent = message;
    this.error.hidden = false;
  }
}
