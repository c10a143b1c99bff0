// A conversation's messages as a tree: which branch is shown, and each message's siblings
// (the `< 2/3 >` switcher). Messages come from the API in creation order, each with its
// parent_id (null for a first message).

export class MessageTree {
  constructor(messages) {
    this.byId = new Map();
    this.children = new Map(); // parent id ("" for the first messages) -> children, oldest first
    for (const message of messages) this.add(message);
  }

  add(message) {
    this.byId.set(message.id, message);
    const key = message.parent_id ?? "";
    if (!this.children.has(key)) this.children.set(key, []);
    const siblings = this.children.get(key);
    if (!siblings.some((m) => m.id === message.id)) siblings.push(message);
  }

  get(id) {
    return this.byId.get(id);
  }

  siblings(message) {
    return this.children.get(message.parent_id ?? "") ?? [message];
  }

  /** The messages from the first one down to `leafId`. */
  branch(leafId) {
    const path = [];
    let message = leafId ? this.byId.get(leafId) : undefined;
    while (message) {
      path.push(message);
      message = message.parent_id ? this.byId.get(message.parent_id) : undefined;
    }
    return path.reverse();
  }

  /** The end of the branch through `id`: its newest child, that one's newest child... */
  latestLeaf(id) {
    let current = id;
    for (;;) {
      const children = this.children.get(current);
      if (!children || children.length === 0) return current;
      current = children[children.length - 1].id;
    }
  }
}
