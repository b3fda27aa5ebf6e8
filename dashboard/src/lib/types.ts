// The shapes the node's API answers with, mirroring the pydantic models in
// ringlet/shared/{state,engine_info,instances}.py, ringlet/api/cluster_schemas.py,
// ringlet/master/placement.py, ringlet/models/catalog.py and ringlet/api/openai_schemas.py.

export type EngineType = 'mlx' | 'ipex' | 'cuda' | 'cpu';

/** The seed's instance types and the mixed ring (each stage on its node's own engine); MlxIbv is the old
 * name of MlxJaccl (the API accepts both). */
export type InstanceMeta = 'MlxRing' | 'MlxIbv' | 'MlxJaccl' | 'CpuRing' | 'CudaRing' | 'IpexRing' | 'MixedRing';
/** The names the API answers with (it never reports the old name). */
export type InstanceType = Exclude<InstanceMeta, 'MlxIbv'>;

export interface EngineProblem {
	reason: string;
	fix: string;
}

export interface EngineInfo {
	available_engines: EngineType[];
	selected_engine: EngineType | null;
	mlx_available: boolean;
	torch_available: boolean;
	cpu_available: boolean;
	cuda_available: boolean;
	ipex_available: boolean;
	intel_gpu_count: number;
	intel_gpu_memory: number;
	ipex_version: string | null;
	reasons: Partial<Record<EngineType, EngineProblem>>;
	notes: Partial<Record<EngineType, string>>;
}

export interface CpuInfo {
	model: string;
	physical_cores: number;
	logical_cores: number;
	flags: string[];
	ram_total_bytes: number;
	ram_available_bytes: number;
}

export interface GpuInfo {
	vendor: string;
	index: number;
	name: string;
	memory_total_bytes: number;
	memory_free_bytes: number | null;
	driver: string | null;
	/** shares the host's memory (an Intel iGPU); null: not known */
	integrated: boolean | null;
	level_zero_version: string | null;
}

export interface NodeHardware {
	system: string;
	machine: string;
	cpu: CpuInfo;
	gpus: GpuInfo[];
	apple_chip: string | null;
}

export interface MemoryInfo {
	total_bytes: number;
	available_bytes: number;
}

export interface NodeInfo {
	node_id: string;
	name: string;
	hardware: NodeHardware;
	engines: EngineInfo;
	memory: MemoryInfo;
	api_port: number | null;
	precision: 'auto' | 'fp32' | 'bf16' | 'fp16' | 'int8' | 'int4';
	/** the models in the node's store */
	models?: StoredModelInfo[];
}

/** A model in a node's store: complete, some layers (partial), or no usable weights yet (incomplete). */
export interface StoredModelInfo {
	model: string;
	bytes: number;
	status: 'complete' | 'partial' | 'incomplete';
}

export interface Link {
	source: string;
	target: string;
	latency_ms: number | null;
}

export type RunnerStatus = 'loading' | 'ready' | 'failed';

/** how far a stage's load is: layers read, and the weight bytes they keep of what the stage will hold */
export interface LayerLoad {
	layers_loaded: number;
	layers_total: number;
	bytes_loaded: number;
	/** estimated from the model card; null where it is unknown */
	bytes_total: number | null;
}

export interface RunnerRecord {
	node_id: string;
	status: RunnerStatus;
	progress: number;
	detail: string;
	/** the last load report (absent from older nodes' states) */
	load?: LayerLoad | null;
	error: string | null;
	pid: number | null;
	context_length: number | null;
	/** the engine the stage runs on (after any fallback) */
	engine: EngineType | null;
	/** what was applied to the model, e.g. IPEX, torch.compile */
	optimization: string | null;
	/** why it left its engine: "ipex -> cpu: reason" */
	fallback: string | null;
}

export interface Shard {
	node_id: string;
	rank: number;
	start: number;
	end: number;
	num_layers: number;
	engine: EngineType;
	/** an IpexRing shard split over several Intel GPUs of its node: each one's layers, in order */
	devices?: DeviceLayers[];
}

export interface DeviceLayers {
	device: number;
	start: number;
	end: number;
}

/** A stage's layers on one Intel GPU, where placement split the stage over several */
export interface DevicePlan extends DeviceLayers {
	memory_bytes: number;
	usable_bytes: number;
}

export interface Instance {
	instance_id: string;
	model: string;
	instance_type: InstanceType;
	shards: Shard[];
	intel_gpu_devices: number[] | null;
	ipex_optimization_level: IpexOptimizationLevel;
	/** the GPUs (CpuRing: processes) of its node each stage is split over by tensor parallelism; 1: not split */
	tensor_parallel?: number;
}

/** How an IpexRing optimises its model: IPEX where usable else torch.compile (auto), or exactly one. */
export type IpexOptimizationLevel = 'auto' | 'ipex' | 'compile' | 'eager';

/** An IpexRing's options (the API refuses them on other instance types). */
export interface IntelOptions {
	intel_gpu_devices: number[] | null;
	ipex_optimization_level: IpexOptimizationLevel;
}

export interface InstanceRecord {
	instance: Instance;
	runners: Record<string, RunnerRecord>;
	memory_bytes: Record<string, number>;
	created_at: number;
	status: RunnerStatus;
	progress: number;
	/** the stages' loads together */
	load?: LayerLoad | null;
	error: string | null;
}

export interface TaskRecord {
	task_id: string;
	instance_id: string;
	model: string;
	origin_node_id: string;
	status: 'queued' | 'running';
	submitted_at: number;
}

export interface ClusterState {
	nodes: Record<string, NodeInfo>;
	links: Link[];
	instances: Record<string, InstanceRecord>;
	tasks: Record<string, TaskRecord>;
	downloads: Record<string, DownloadRecord>;
	last_event: number;
}

/** A model download on one node, as /state lists it (`done` and `total` in bytes). */
export interface DownloadRecord {
	download_id: string;
	node_id: string;
	model: string;
	layers: [number, number] | null;
	state: 'running' | 'done' | 'failed' | 'cancelled';
	done: number;
	total: number;
	error: string | null;
}

/** The answer of POST /models/download and DELETE /models/downloads/{id}: the download on the node asked. */
export interface DownloadStatus {
	download_id: string;
	model: string;
	layers: [number, number] | null;
	state: DownloadRecord['state'];
	done: number;
	total: number;
	error: string | null;
	path: string | null;
}

export interface ModelCard {
	id: string;
	architecture: string;
	format: 'safetensors' | 'gguf';
	source: 'catalog' | 'embedded' | 'hub' | 'local' | 'ollama';
	num_layers: number;
	hidden_size: number;
	num_attention_heads: number;
	num_key_value_heads: number;
	head_dim: number;
	vocab_size: number;
	tie_word_embeddings: boolean;
	num_parameters: number;
	layer_parameters: number;
	embedding_parameters: number;
	bytes_per_dtype: Record<string, number>;
	context_length: number;
	instance_types: InstanceType[];
	download_bytes: number | null;
}

export interface InstanceTypeFit {
	instance_type: InstanceType;
	possible: boolean;
	reason: string | null;
}

export interface CatalogModel {
	card: ModelCard;
	on_disk: boolean;
	/** the nodes whose stores hold the model's weights (all or some layers) */
	on_nodes?: string[];
	instance_ids: string[];
	fits: InstanceTypeFit[];
}

export interface ModelsResponse {
	models: CatalogModel[];
}

export interface StagePlan {
	node_id: string;
	node_name: string;
	engine: EngineType;
	start: number;
	end: number;
	memory_bytes: number;
	/** of memory_bytes, the weights as the engine holds them */
	weight_bytes?: number;
	/** of memory_bytes, the KV cache */
	kv_bytes?: number;
	/** a dtype, or a quantised format: int8, int4/128, int4/32 */
	weight_format?: string;
	usable_bytes: number;
	/** an Intel GPU stage on one device: the device index placement counted with */
	device: number | null;
	/** an Intel GPU stage split over devices */
	devices?: DevicePlan[];
	/** the GPUs (CpuRing: processes) the stage is split over by tensor parallelism; usable_bytes counts them together */
	tensor_parallel?: number;
	/** how those GPUs are linked: NVLink, PCIe, loopback (CPU processes) or unknown; null when not split */
	link?: string | null;
}

export interface PlacementPreview {
	instance_type: InstanceType;
	possible: boolean;
	reason: string | null;
	stages: StagePlan[];
}

export interface PreviewsResponse {
	model: string;
	card: ModelCard;
	previews: PlacementPreview[];
}

export interface CreateInstanceRequest {
	model: string;
	instance_type: InstanceMeta;
	nodes?: string[];
	min_nodes?: number;
	intel_gpu_devices?: number[] | null;
	ipex_optimization_level?: IpexOptimizationLevel;
	/** CudaRing, CpuRing: split each stage over this many GPUs (processes) of its node; the API refuses it on others */
	tensor_parallel?: number;
}

export interface DeletedInstance {
	instance_id: string;
	deleted: true;
}

export interface ErrorResponse {
	error: { message: string; type: string; param: string | null; code: string | null };
}

export interface Timings {
	time_to_first_token_s: number;
	prefill_tokens_per_s: number;
	decode_tokens_per_s: number;
}

export interface Usage {
	prompt_tokens: number;
	completion_tokens: number;
	total_tokens: number;
}

/** One streamed piece of a chat answer. Servers that parse a model's thinking send it apart from the answer:
 * `reasoning_content` (DeepSeek, vLLM) or `reasoning` (newer vLLM). */
export interface ChatDelta {
	role?: 'assistant' | null;
	content?: string | null;
	reasoning_content?: string | null;
	reasoning?: string | null;
}

export interface ChatCompletionChunk {
	id: string;
	object: 'chat.completion.chunk';
	created: number;
	model: string;
	choices: { index: number; delta: ChatDelta; finish_reason: string | null }[];
	usage?: Usage | null;
	timings?: Timings | null;
}

export interface ChatMessage {
	role: 'system' | 'user' | 'assistant';
	content: string;
}
