// Streaming chat against /v1/chat/completions: server-sent events read from fetch's ReadableStream
// (EventSource cannot POST), so aborting the fetch closes the connection and the node stops generating.

import { ApiError, errorFrom, fetchWithKey } from './api';
import type { ChatCompletionChunk, ChatDelta, ChatMessage, ErrorResponse } from './types';

export interface ChatRequest {
	model: string;
	messages: ChatMessage[];
	max_tokens: number;
	temperature: number;
}

/** Splits a text buffer into complete SSE events' data fields; returns them and the unfinished rest. */
export function takeSseData(buffer: string): { data: string[]; rest: string } {
	const normalised = buffer.replace(/\r\n?/g, '\n');
	const blocks = normalised.split('\n\n');
	const rest = blocks.pop() ?? '';
	const data = blocks
		.map((block) =>
			block
				.split('\n')
				.filter((line) => line.startsWith('data:'))
				.map((line) => line.slice(5).replace(/^ /, ''))
				.join('\n')
		)
		.filter((payload) => payload.length > 0);
	return { data, rest };
}

/** The chunks of one streamed completion, ending before `[DONE]`; throws ApiError on an error status or event. */
export async function* streamChat(request: ChatRequest, signal: AbortSignal): AsyncGenerator<ChatCompletionChunk> {
	const response = await fetchWithKey('v1/chat/completions', {
		method: 'POST',
		headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream' },
		body: JSON.stringify({ ...request, stream: true, stream_options: { include_usage: true } }),
		signal
	});
	if (!response.ok) throw await errorFrom(response);
	if (!response.body) throw new ApiError(response.status, 'the node answered without a body');

	const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
	let buffer = '';
	try {
		for (;;) {
			const { value, done } = await reader.read();
			if (done) break;
			const { data, rest } = takeSseData(buffer + value);
			buffer = rest;
			for (const payload of data) {
				if (payload === '[DONE]') return;
				const event = JSON.parse(payload) as ChatCompletionChunk | ErrorResponse;
				if ('error' in event) throw new ApiError(response.status, event.error.message, event.error.code);
				yield event;
			}
		}
	} finally {
		reader.releaseLock();
	}
	throw new ApiError(response.status, 'the stream ended before [DONE]; the node may have stopped');
}

/** The thinking and the answer text of one streamed delta (either may be empty). */
export function deltaText(delta: ChatDelta): { reasoning: string; content: string } {
	return { reasoning: delta.reasoning_content ?? delta.reasoning ?? '', content: delta.content ?? '' };
}

/** Timing of one answer as the browser saw it (thinking tokens count: they take the instance's time too); the
 * node's own figures are kept next to it. */
export class StreamClock {
	readonly startedAt = performance.now();
	firstTokenAt: number | null = null;
	lastTokenAt: number | null = null;
	tokens = 0;

	token(): void {
		const now = performance.now();
		this.firstTokenAt ??= now;
		this.lastTokenAt = now;
		this.tokens += 1;
	}

	get timeToFirstTokenS(): number | null {
		return this.firstTokenAt === null ? null : (this.firstTokenAt - this.startedAt) / 1000;
	}

	/** decode rate: tokens after the first, over the time since the first */
	get tokensPerS(): number | null {
		if (this.firstTokenAt === null || this.lastTokenAt === null || this.tokens < 2) return null;
		const seconds = (this.lastTokenAt - this.firstTokenAt) / 1000;
		return seconds > 0 ? (this.tokens - 1) / seconds : null;
	}
}
