// A conversation's messages as a tree: which branch is shown, and each message's siblings
// (the `< 2/3 >` switcher). Messages come from the API in creation order, each with its
// parent_id (null for a first message).

import type { Message } from "./types";

export class MessageTree {
  private readonly byId = new Map<string, Message>();
  /** parent id ("" for the first messages) -> children, oldest first */
  private readonly children = new Map<string, Message[]>();

  constructor(messages: Message[]) {
    for (const message of messages) this.add(message);
  }

  add(message: Message): void {
    this.byId.set(message.id, message);
    const key = message.parent_id ?? "";
    let siblings = this.children.get(key);
    if (!siblings) {
      siblings = [];
      this.children.set(key, siblings);
    }
    if (!siblings.some((m) => m.id === message.id)) siblings.push(message);
  }

  get(id: string): Message | undefined {
    return this.byId.get(id);
  }

  siblings(message: Message): Message[] {
    return this.children.get(message.parent_id ?? "") ?? [message];
  }

  /** The messages from the first one down to `leafId`. */
  branch(leafId: string | null): Message[] {
    const path: Message[] = [];
    let message = leafId ? this.byId.get(leafId) : undefined;
    while (message) {
      path.push(message);
      message = message.parent_id ? this.byId.get(message.parent_id) : undefined;
    }
    return path.reverse();
  }

  /** The end of the branch through `id`: its newest child, that one's newest child... */
  latestLeaf(id: string): string {
    let current = id;
    for (;;) {
      const children = this.children.get(current);
      if (!children || children.length === 0) return current;
      current = children[children.length - 1]!.id;
    }
  }
}
