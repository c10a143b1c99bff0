// The shapes of what kiln's chat API answers (src/kiln/store/records.py, server/admin.py).

export type Role = "user" | "assistant";
export type MessageStatus = "streaming" | "complete" | "stopped" | "interrupted" | "error";

export interface Message {
  id: string;
  conversation_id: string;
  parent_id: string | null;
  role: Role;
  content: string;
  status: MessageStatus;
  created_at: number;
  model: string | null;
  error: string | null;
  truncated: boolean;
}

/** Generation settings: null (or absent) means "the model's default". */
export interface Settings {
  temperature?: number | null;
  top_p?: number | null;
  top_k?: number | null;
  max_new_tokens?: number | null;
  repetition_penalty?: number | null;
}

export interface ConversationSummary {
  id: string;
  title: string;
  created_at: number;
  updated_at: number;
  system_prompt: string;
  settings: Settings;
  current_leaf_id: string | null;
}

export interface Conversation extends ConversationSummary {
  messages: Message[];
  branch: string[];
}

export interface SearchHit {
  conversation_id: string;
  conversation_title: string;
  message_id: string;
  role: Role;
  snippet: string;
  created_at: number;
}

export interface ModelStatus {
  name: string;
  model: string | null;
  status: "available" | "loading" | "unloading" | "unloaded" | "failed";
  reason: string | null;
  active: boolean;
}

export interface Defaults {
  model: string;
  settings: Settings;
}

/** The server-sent events of an answer (POST .../messages, .../regenerate). */
export type AnswerEvent =
  | { type: "start"; user: Message | null; assistant: Message }
  | { type: "delta"; text: string }
  | { type: "end"; message: Message }
  | { type: "error"; error: string };

/** What a failed call says: an API error's message, else the error's own. */
export function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
