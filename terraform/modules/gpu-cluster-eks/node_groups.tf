locals {
  gpu_taint = {
    key    = "nvidia.com/gpu"
    value  = "true"
    effect = "NO_SCHEDULE"
  }

  # Bottlerocket keeps the OS on a small /dev/xvda and container images on
  # /dev/xvdb; AL2023 has one root volume.
  gpu_data_device = startswith(var.gpu_ami_type, "BOTTLEROCKET") ? "/dev/xvdb" : "/dev/xvda"

  system_node_group = {
    system = {
      ami_type       = "AL2023_x86_64_STANDARD"
      instance_types = var.system_node_group.instance_types
      min_size       = var.system_node_group.min_size
      max_size       = var.system_node_group.max_size
      desired_size   = var.system_node_group.desired_size
      labels = {
        "expertmesh.io/pool" = "system"
      }
      block_device_mappings = {
        root = {
          device_name = "/dev/xvda"
          ebs = {
            volume_size           = var.system_node_group.disk_size_gb
            volume_type           = "gp3"
            encrypted             = true
            delete_on_termination = true
          }
        }
      }
    }
  }

  # Our labels win over user labels so the pool selector in the KubeRay
  # manifests always matches.
  gpu_group_labels = {
    for g in var.gpu_node_groups : g.name => merge(g.labels, {
      "expertmesh.io/pool"            = g.name
      "nvidia.com/gpu.present"        = "true"
      "k8s.amazonaws.com/accelerator" = var.gpu_accelerator_label
    })
  }

  gpu_node_groups = {
    for g in var.gpu_node_groups : g.name => {
      ami_type       = var.gpu_ami_type
      instance_types = g.instance_types
      capacity_type  = g.capacity_type
      min_size       = g.min_size # may be 0: the autoscaler scales the group up from zero
      max_size       = g.max_size
      desired_size   = g.desired_size
      labels         = local.gpu_group_labels[g.name]
      taints = {
        gpu = local.gpu_taint # nvidia.com/gpu=true:NoSchedule
      }
      block_device_mappings = {
        data = {
          device_name = local.gpu_data_device
          ebs = {
            volume_size           = g.disk_size_gb
            volume_type           = "gp3"
            iops                  = 6000
            throughput            = 500
            encrypted             = true
            delete_on_termination = true
          }
        }
      }
      tags = {
        "expertmesh.io/pool" = g.name
      }
    }
  }

  # Scale from zero: with no node of a group running, the cluster autoscaler
  # cannot look at a node to learn what the group offers. It reads these
  # node-template tags on the group's Auto Scaling group instead; without the
  # taint and GPU-count tags it would believe a p5 node has no GPUs and would
  # never pick that group for a pod requesting nvidia.com/gpu.
  gpu_asg_tags = merge([
    for g in var.gpu_node_groups : merge(
      {
        for k, v in local.gpu_group_labels[g.name] : "${g.name}/label/${k}" => {
          group = g.name
          key   = "k8s.io/cluster-autoscaler/node-template/label/${k}"
          value = v
        }
      },
      {
        "${g.name}/taint/nvidia.com/gpu" = {
          group = g.name
          key   = "k8s.io/cluster-autoscaler/node-template/taint/nvidia.com/gpu"
          value = "true:NoSchedule"
        }
        "${g.name}/resources/nvidia.com/gpu" = {
          group = g.name
          key   = "k8s.io/cluster-autoscaler/node-template/resources/nvidia.com/gpu"
          value = tostring(g.gpus_per_node)
        }
        "${g.name}/resources/ephemeral-storage" = {
          group = g.name
          key   = "k8s.io/cluster-autoscaler/node-template/resources/ephemeral-storage"
          value = "${g.disk_size_gb}G"
        }
      },
    )
  ]...)
}

# Managed node groups do not copy their tags onto the Auto Scaling group they
# create, so the node-template tags are attached to the ASG directly.
resource "aws_autoscaling_group_tag" "gpu_node_template" {
  for_each = local.gpu_asg_tags

  autoscaling_group_name = module.eks.eks_managed_node_groups[each.value.group].node_group_autoscaling_group_names[0]

  tag {
    key                 = each.value.key
    value               = each.value.value
    propagate_at_launch = false
  }
}
