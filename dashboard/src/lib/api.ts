// Calls to the node that serves this page. Paths are relative to the page's origin, so the dashboard
// only ever talks to the node it came from (and, under `npm run dev`, to the node Vite proxies to).

import type {
	ClusterState,
	CreateInstanceRequest,
	DeletedInstance,
	DownloadStatus,
	EngineInfo,
	ErrorResponse,
	InstanceRecord,
	IntelOptions,
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

const KEY_STORAGE = 'ringlet-api-key';
let askingForKey: Promise<string | null> | null = null;
let declined = false; // the prompt was dismissed: the 401 shows as an error until the page is reloaded

function withKey(init: RequestInit, key: string | null): RequestInit {
	return key ? { ...init, headers: { ...init.headers, Authorization: `Bearer ${key}` } } : init;
}

/** The node's API key, asked for once however many calls were refused at the same time; null if none given. */
function askForKey(): Promise<string | null> {
	askingForKey ??= Promise.resolve().then(() => {
		const key = window.prompt('This node wants its API key (the --api-key or RINGLET_API_KEY it was started with):');
		if (key?.trim()) localStorage.setItem(KEY_STORAGE, key.trim());
		else declined = true;
		askingForKey = null;
		return key?.trim() || null;
	});
	return askingForKey;
}

/** fetch with the API key this browser keeps for the node; a 401 asks for the key (once) and tries again. */
export async function fetchWithKey(path: string, init: RequestInit = {}): Promise<Response> {
	const sent = localStorage.getItem(KEY_STORAGE);
	const response = await fetch(path, withKey(init, sent));
	if (response.status !== 401 || declined) return response;
	let key = localStorage.getItem(KEY_STORAGE);
	if (key === sent) {
		// refused with the key kept here (or none): ask, unless another call is asking already
		if (sent !== null) localStorage.removeItem(KEY_STORAGE);
		key = await askForKey();
	}
	return key ? fetch(path, withKey(init, key)) : response;
}

async function request<T>(path: string, init: RequestInit = {}): Promise<T> {
	const signal = init.signal ?? AbortSignal.timeout(REQUEST_TIMEOUT_MS);
	const response = await fetchWithKey(path, { ...init, signal, headers: { Accept: 'application/json', ...init.headers } });
	if (!response.ok) throw await errorFrom(response);
	return (await response.json()) as T;
}

export const getState = (): Promise<ClusterState> => request('state', { cache: 'no-store' });
export const getModels = (): Promise<ModelsResponse> =>
	request('models', { signal: AbortSignal.timeout(SLOW_REQUEST_TIMEOUT_MS) });
export const getEngines = (): Promise<EngineInfo> => request('engines');
export const getNodeId = (): Promise<{ node_id: string; name: string }> => request('node_id');

export function getPreviews(
	model: string,
	minNodes: number,
	intel: IntelOptions | null = null,
	tensorParallel = 1
): Promise<PreviewsResponse> {
	const query = new URLSearchParams({ model, min_nodes: String(minNodes) });
	for (const device of intel?.intel_gpu_devices ?? []) query.append('intel_gpu_devices', String(device));
	if (intel) query.set('ipex_optimization_level', intel.ipex_optimization_level);
	if (tensorParallel > 1) query.set('tensor_parallel', String(tensorParallel));
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

/** Start (or join the running) download of a model into the store of a node (null: this node, the one serving the
 * page; another node's is reached through it); its progress comes in /state. */
export function startDownload(model: string, nodeId: string | null = null): Promise<DownloadStatus> {
	return request('models/download', {
		method: 'POST',
		headers: { 'Content-Type': 'application/json' },
		body: JSON.stringify(nodeId ? { model, node_id: nodeId } : { model })
	});
}

/** This node's downloads, with their progress as its download manager has it now. */
export const listDownloads = (): Promise<DownloadStatus[]> => request('models/downloads', { cache: 'no-store' });

/** Cancel a download, on whichever node runs it. */
export function cancelDownload(downloadId: string): Promise<DownloadStatus> {
	return request(`models/downloads/${encodeURIComponent(downloadId)}`, { method: 'DELETE' });
}

/** Remove a model's files from a node's store (null: this node's; refused while an instance serves it). */
export function deleteModel(model: string, nodeId: string | null = null): Promise<{ model: string; node_id: string }> {
	const path = model.split('/').map(encodeURIComponent).join('/');
	const query = nodeId ? `?${new URLSearchParams({ node_id: nodeId })}` : '';
	return request(`models/${path}${query}`, { method: 'DELETE', signal: AbortSignal.timeout(SLOW_REQUEST_TIMEOUT_MS) });
}
