// Chat conversations kept in this browser's localStorage, so they survive a reload. Nothing is kept on the
// node. What is read back is checked field by field: a store written by another version (or edited by hand)
// loses the conversations it cannot read, never the page.

import type { Timings } from './types';

const STORAGE_KEY = 'ringlet-conversations';
const KEPT = 50; // conversations kept; the oldest go first, and more of them when the browser's quota is full

export interface AnswerStats {
	/** seconds from sending to the first token, as this browser saw it */
	ttftS: number | null;
	/** decode rate as this browser saw it: tokens after the first, over the time since the first */
	tokensPerS: number | null;
	tokens: number;
	finish: string | null;
	/** the node's own figures for the answer */
	server: Timings | null;
}

export interface Turn {
	role: 'user' | 'assistant';
	content: string;
	/** the model's thinking, streamed apart from the answer (`reasoning_content`) */
	reasoning?: string;
	stats?: AnswerStats;
	error?: string;
	stopped?: boolean;
	/** the model that answered */
	model?: string;
}

export interface Conversation {
	id: string;
	title: string;
	turns: Turn[];
	updatedAt: number;
}

export interface SavedChats {
	conversations: Conversation[];
	activeId: string | null;
}

export function newConversation(): Conversation {
	return { id: crypto.randomUUID(), title: '', turns: [], updatedAt: Date.now() };
}

/** The first words of the first question: what the list of conversations shows. */
export function titleOf(turns: Turn[]): string {
	const first = turns.find((t) => t.role === 'user')?.content.trim().replace(/\s+/g, ' ') ?? '';
	return first.length > 60 ? `${first.slice(0, 57)}…` : first;
}

/** The answer's text split from the thinking a model wrote inline as `<think>…</think>` (an open tag: all of
 * it is thinking so far). Text without a leading think tag is all answer. */
export function splitThinking(content: string): { thinking: string; answer: string } {
	const match = /^\s*<think>/.exec(content);
	if (!match) return { thinking: '', answer: content };
	const rest = content.slice(match[0].length);
	const end = rest.indexOf('</think>');
	if (end < 0) return { thinking: rest, answer: '' };
	return { thinking: rest.slice(0, end), answer: rest.slice(end + '</think>'.length).replace(/^\s+/, '') };
}

const isObject = (value: unknown): value is Record<string, unknown> => typeof value === 'object' && value !== null;
const numberOrNull = (value: unknown): number | null => (typeof value === 'number' && Number.isFinite(value) ? value : null);

function readStats(value: unknown): AnswerStats | undefined {
	if (!isObject(value)) return undefined;
	const server = isObject(value.server) ? (value.server as unknown as Timings) : null;
	return {
		ttftS: numberOrNull(value.ttftS),
		tokensPerS: numberOrNull(value.tokensPerS),
		tokens: numberOrNull(value.tokens) ?? 0,
		finish: typeof value.finish === 'string' ? value.finish : null,
		server
	};
}

function readTurn(value: unknown): Turn | null {
	if (!isObject(value) || (value.role !== 'user' && value.role !== 'assistant') || typeof value.content !== 'string') return null;
	const turn: Turn = { role: value.role, content: value.content };
	if (typeof value.reasoning === 'string') turn.reasoning = value.reasoning;
	if (typeof value.error === 'string') turn.error = value.error;
	if (value.stopped === true) turn.stopped = true;
	if (typeof value.model === 'string') turn.model = value.model;
	const stats = readStats(value.stats);
	if (stats) turn.stats = stats;
	return turn;
}

function readConversation(value: unknown): Conversation | null {
	if (!isObject(value) || typeof value.id !== 'string' || !Array.isArray(value.turns)) return null;
	const turns = value.turns.map(readTurn).filter((t) => t !== null);
	return {
		id: value.id,
		title: typeof value.title === 'string' ? value.title : titleOf(turns),
		turns,
		updatedAt: numberOrNull(value.updatedAt) ?? 0
	};
}

export function loadChats(storage: Storage = localStorage): SavedChats {
	const text = storage.getItem(STORAGE_KEY);
	if (!text) return { conversations: [], activeId: null };
	let saved: unknown;
	try {
		saved = JSON.parse(text);
	} catch {
		return { conversations: [], activeId: null }; // not JSON: nothing in it can be read back
	}
	if (!isObject(saved) || !Array.isArray(saved.conversations)) return { conversations: [], activeId: null };
	const conversations = saved.conversations.map(readConversation).filter((c) => c !== null);
	const activeId = typeof saved.activeId === 'string' && conversations.some((c) => c.id === saved.activeId) ? saved.activeId : null;
	return { conversations, activeId };
}

/** Keeps the newest conversations that fit: past `KEPT`, or when the browser refuses the size, the oldest go. */
export function saveChats(chats: SavedChats, storage: Storage = localStorage): void {
	const newestFirst = [...chats.conversations].sort((a, b) => b.updatedAt - a.updatedAt).slice(0, KEPT);
	for (let kept = newestFirst.length; kept >= 0; kept -= 1) {
		try {
			storage.setItem(STORAGE_KEY, JSON.stringify({ conversations: newestFirst.slice(0, kept), activeId: chats.activeId }));
			return;
		} catch (error) {
			if (!(error instanceof DOMException && error.name === 'QuotaExceededError')) throw error;
		}
	}
}
