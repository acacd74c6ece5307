module "cluster" {
  source = "../../modules/gpu-cluster-gke"

  project_id                 = var.project_id
  name                       = var.name
  location                   = var.location
  master_authorized_networks = [for c in var.admin_cidr_blocks : { cidr_block = c, display_name = "admin ${c}" }]
  max_total_gpus             = var.max_total_gpus
  deletion_protection        = var.deletion_protection
  grafana_admin_password     = random_password.grafana_admin.result
  labels                     = var.labels

  # Two GPU pools so attention and expert actors scale independently; both
  # start at zero nodes and cost nothing until a Ray pod asks for a GPU.
  gpu_node_pools = [
    {
      name              = "gpu-attention"
      machine_type      = "a3-highgpu-8g"
      accelerator_type  = "nvidia-h100-80gb"
      accelerator_count = 8
      min_size          = 0
      max_size          = var.attention_max_nodes
      spot              = var.gpu_spot
      node_locations    = var.gpu_zones
      labels            = { "expertmesh.io/role" = "attention" }
    },
    {
      name              = "gpu-experts"
      machine_type      = "a3-highgpu-8g"
      accelerator_type  = "nvidia-h100-80gb"
      accelerator_count = 8
      min_size          = 0
      max_size          = var.experts_max_nodes
      spot              = var.gpu_spot
      node_locations    = var.gpu_zones
      labels            = { "expertmesh.io/role" = "experts" }
    },
  ]
}

resource "random_password" "grafana_admin" {
  length  = 24
  special = false
}

# expertmesh itself: namespace, Secrets, the KubeRay manifests of infra/k8s and
# the Grafana dashboard, once the operator and Prometheus (hence their CRDs) are in.
module "expertmesh" {
  source = "../../modules/expertmesh-app"

  image                = var.image
  model_source         = var.model_source
  hf_token             = var.hf_token
  apply_finetune_job   = var.apply_finetune_job
  monitoring_namespace = module.cluster.monitoring_namespace

  depends_on = [module.cluster]
}
