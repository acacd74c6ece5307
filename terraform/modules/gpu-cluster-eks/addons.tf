# In-cluster add-ons. Chart versions are pinned literally (not variables) so a
# plan never pulls a chart nobody reviewed.

locals {
  cluster_autoscaler_sa = "cluster-autoscaler"

  gpu_toleration = {
    key      = "nvidia.com/gpu"
    operator = "Exists"
    effect   = "NoSchedule"
  }

  # Cluster-wide daemons stay off GPU nodes unless they must run there.
  system_node_selector = {
    "expertmesh.io/pool" = "system"
  }
}

resource "helm_release" "cluster_autoscaler" {
  name       = "cluster-autoscaler"
  namespace  = "kube-system"
  repository = "https://kubernetes.github.io/autoscaler"
  chart      = "cluster-autoscaler"
  version    = "9.46.6"

  values = [yamlencode({
    cloudProvider = "aws"
    awsRegion     = data.aws_region.current.name
    autoDiscovery = {
      # Managed node groups tag their ASGs with k8s.io/cluster-autoscaler/<name>.
      clusterName = module.eks.cluster_name
    }
    rbac = {
      serviceAccount = {
        create = true
        name   = local.cluster_autoscaler_sa
        annotations = {
          "eks.amazonaws.com/role-arn" = module.cluster_autoscaler_irsa.iam_role_arn
        }
      }
    }
    nodeSelector = local.system_node_selector
    extraArgs = {
      expander                      = var.cluster_autoscaler_expander
      "balance-similar-node-groups" = true
      "skip-nodes-with-system-pods" = false
      "scale-down-unneeded-time"    = var.scale_down_unneeded_time
      # A freshly added GPU node spends minutes pulling the image and loading
      # weights; do not consider removing it before then.
      "scale-down-delay-after-add" = "15m"
      # Cluster-wide GPU ceiling. The GPU type is matched against the value of
      # the k8s.amazonaws.com/accelerator label every GPU group carries.
      "gpu-total" = "${var.gpu_accelerator_label}:0:${var.max_total_gpus}"
    }
  })]

  depends_on = [module.eks]
}

resource "helm_release" "nvidia_device_plugin" {
  name       = "nvidia-device-plugin"
  namespace  = "kube-system"
  repository = "https://nvidia.github.io/k8s-device-plugin"
  chart      = "nvidia-device-plugin"
  version    = "0.17.1"

  values = [yamlencode({
    # Only GPU nodes; they carry the nvidia.com/gpu taint, hence the toleration.
    nodeSelector = {
      "nvidia.com/gpu.present" = "true"
    }
    tolerations = [local.gpu_toleration]
  })]

  depends_on = [module.eks]
}

# The KubeRay operator and kube-prometheus-stack, as on every expertmesh cluster.
module "kuberay_stack" {
  source = "../kuberay-stack"

  grafana_admin_password = var.grafana_admin_password
  node_selector          = local.system_node_selector

  depends_on = [module.eks]
}

resource "helm_release" "dcgm_exporter" {
  name       = "dcgm-exporter"
  namespace  = module.kuberay_stack.monitoring_namespace
  repository = "https://nvidia.github.io/dcgm-exporter/helm-charts"
  chart      = "dcgm-exporter"
  version    = "4.1.0"

  values = [yamlencode({
    nodeSelector = {
      "nvidia.com/gpu.present" = "true"
    }
    tolerations = [local.gpu_toleration]
    serviceMonitor = {
      enabled = true
    }
  })]

  # The ServiceMonitor CRD comes with kube-prometheus-stack.
  depends_on = [module.kuberay_stack]
}
