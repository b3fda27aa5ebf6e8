// Calls to the node that serves this page. Paths are relative to the page's origin, so the dashboard
// only ever talks to the node it came from (and, under `npm run dev`, to the node Vite proxies to).

import type {
	ClusterState,
	CreateInstanceRequest,
	DeletedInstance,
	EngineInfo,
	ErrorResponse,
	InstanceRecord,
	ModelsResponse,
	PreviewsResponse
} from './types';

const REQUEST_TIMEOUT_MS = 8000;
// the node's first catalog request reads the embedded model's header and imports torch: seconds, cold
const SLOW_REQUEST_TIMEOUT_MS = 60000;

/** The node answered with an error status; `message` is the node's own explanation. */
export class ApiError extends Error {
	constructor(
		readonly status: number,
		message: string,
		readonly code: string | null = null
	) {
		super(message);
		this.name = 'ApiError';
	}
}

/** The node's error message, from OpenAI's `{"error": {...}}` shape, else the body text. */
export async function errorFrom(response: Response): Promise<ApiError> {
	const text = await response.text();
	try {
		const body = JSON.parse(text) as Partial<ErrorResponse>;
		if (body.error?.message) return new ApiError(response.status, body.error.message, body.error.code);
	} catch {
		// not JSON (a proxy's error page): the text itself is the best explanation there is
	}
	return new ApiError(response.status, `${response.status} ${response.statusText}: ${text.slice(0, 200)}`);
}

/** A message for any failure of a call: the node's reason, or why the node could not be reached. */
export function describeError(error: unknown): string {
	if (error instanceof ApiError) return error.message;
	if (error instanceof DOMException && error.name === 'TimeoutError') return 'the node did not answer in time';
	if (error instanceof TypeError) return 'cannot reach the node (is `ringlet node` running?)';
	return error instanceof Error ? error.message : String(error);
}

async function request<T>(path: string, init: RequestInit = {}): Promise<T> {
	const signal = init.signal ?? AbortSignal.timeout(REQUEST_TIMEOUT_MS);
	const response = await fetch(path, { ...init, signal, headers: { Accept: 'application/json', ...init.headers } });
	if (!response.ok) throw await errorFrom(response);
	return (await response.json()) as T;
}

export const getState = (): Promise<ClusterState> => request('state', { cache: 'no-store' });
export const getModels = (): Promise<ModelsResponse> =>
	request('models', { signal: AbortSignal.timeout(SLOW_REQUEST_TIMEOUT_MS) });
export const getEngines = (): Promise<EngineInfo> => request('engines');
export const getNodeId = (): Promise<{ node_id: string; name: string }> => request('node_id');

export function getPreviews(model: string, minNodes: number): Promise<PreviewsResponse> {
	const query = new URLSearchParams({ model, min_nodes: String(minNodes) });
	return request(`instance/previews?${query}`, { signal: AbortSignal.timeout(SLOW_REQUEST_TIMEOUT_MS) });
}

export function createInstance(body: CreateInstanceRequest): Promise<InstanceRecord> {
	return request('instance', {
		method: 'POST',
		signal: AbortSignal.timeout(SLOW_REQUEST_TIMEOUT_MS),
		headers: { 'Content-Type': 'application/json' },
		body: JSON.stringify(body)
	});
}

export function deleteInstance(instanceId: string): Promise<DeletedInstance> {
	return request(`instance/${encodeURIComponent(instanceId)}`, { method: 'DELETE' });
}
