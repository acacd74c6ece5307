module "cluster" {
  source = "../../modules/gpu-cluster-eks"

  name                                 = var.name
  kubernetes_version                   = var.kubernetes_version
  availability_zones                   = var.availability_zones
  cluster_endpoint_public_access_cidrs = var.admin_cidr_blocks
  gpu_accelerator_label                = var.gpu_accelerator_label
  max_total_gpus                       = var.max_total_gpus
  grafana_admin_password               = random_password.grafana_admin.result

  # Two GPU groups so attention and expert actors scale independently; both
  # start at zero nodes and cost nothing until a Ray pod asks for a GPU.
  gpu_node_groups = [
    {
      name           = "gpu-attention"
      instance_types = var.gpu_instance_types
      capacity_type  = var.gpu_capacity_type
      min_size       = 0
      max_size       = var.attention_max_nodes
      labels         = { "expertmesh.io/role" = "attention" }
    },
    {
      name           = "gpu-experts"
      instance_types = var.gpu_instance_types
      capacity_type  = var.gpu_capacity_type
      min_size       = 0
      max_size       = var.experts_max_nodes
      labels         = { "expertmesh.io/role" = "experts" }
    },
  ]

  tags = var.tags
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
